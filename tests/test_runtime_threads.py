"""One Model shared by threads; snapshots; and a runtime that never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np

import rnnedge
from tests import runtime_graphs as G

THREADS = 8
STREAMS_PER_THREAD = 3
STEPS = 30


def work(model, seed: int) -> list:
    """Every output of a few streams fed seeded chunks of varying length, interleaved."""
    rng = np.random.default_rng(seed)
    streams = [model.stream(batch=1 + k) for k in range(STREAMS_PER_THREAD)]
    outs = []
    for _ in range(STEPS):
        for k, stream in enumerate(streams):
            length = int(rng.integers(1, 5))
            x = rng.standard_normal((1 + k, length, 3)).astype(np.float32)
            outs.append(stream.step(x))
            if rng.random() < 0.1:
                stream.reset()
    outs.extend(s.state["h0"] for s in streams)
    return outs


def test_threads_sharing_a_model_equal_serial_runs():
    model = rnnedge.load(G.rnn("LSTM", layers=2, batch_first=True), device="cpu")
    serial = [work(model, seed) for seed in range(THREADS)]
    results: dict = {}
    errors: list = []
    barrier = threading.Barrier(THREADS)

    def target(seed):
        try:
            barrier.wait()
            results[seed] = work(model, seed)
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed in range(THREADS):
        assert len(results[seed]) == len(serial[seed])
        for got, want in zip(results[seed], serial[seed]):
            np.testing.assert_array_equal(got, want)


def test_snapshot_restore_is_bit_exact():
    model = rnnedge.load(G.rnn("GRU", layers=2), device="cpu")
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((int(rng.integers(1, 6)), 2, 3)).astype(np.float32) for _ in range(12)]
    stream = model.stream(2)
    for x in xs[:5]:
        stream.step(x)
    snap = stream.state
    first = [stream.step(x) for x in xs[5:]]
    end = stream.state
    stream.state = snap
    again = [stream.step(x) for x in xs[5:]]
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()
    for name in end:
        assert stream.state[name].tobytes() == end[name].tobytes()
    # A snapshot moves between streams, too.
    other = model.stream(2)
    other.state = snap
    assert other.step(xs[5]).tobytes() == first[0].tobytes()


BLOCK_TORCH = textwrap.dedent("""
    import sys

    class Block:
        # Fails any import of torch or onnx, as on an edge device that has neither.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
                raise ImportError(f"{name} is blocked: edge devices do not have it")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import numpy as np
    import rnnedge
    from rnnedge.runtime import Model, Pool, Stream, load  # noqa: F401

    model = rnnedge.load(sys.argv[1], device="cpu")
    stream = model.stream(batch=1)
    y = stream.run(np.ones((4, 1, 3), np.float32), chunk=3)
    pool = model.pool()
    sid = pool.add()
    pool.step({sid: np.ones((1, 1, 3), np.float32)})
    bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript")]
    assert not bad, bad
    print("ok", y.shape)
""")


def test_runtime_runs_without_torch_or_onnx(tmp_path: Path):
    graph = tmp_path / "gru.onnx"
    graph.write_bytes(G.rnn("GRU"))
    script = tmp_path / "edge.py"
    script.write_text(BLOCK_TORCH)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(graph)], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok (4, 1, 5)"
