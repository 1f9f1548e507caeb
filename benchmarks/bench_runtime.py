"""Per-step latency of the rnnedge runtime against hand-written onnxruntime loops and a floor.

    python benchmarks/bench_runtime.py [--rounds 100] [--steps 50] [--threads 1]

For a 2-layer LSTM 64->256 and a 1-layer GRU 64->256 (graphs built here with
onnx.helper, rnnedge metadata attached, batch 1, one step per call) it times:

  plain    session.run with the state as numpy arrays (fed back each step)
  swap     a hand-written IOBinding loop: bind x, bind state in/out to two OrtValue
           buffers, run, swap the buffers
  stream   rnnedge Stream.step
  run-only the same bound run with no input/output copies or checks: onnxruntime's own
           cost, which no Python step loop can beat
  floor    weight bytes of one step / the GEMV bandwidth of this machine: the time
           numpy (1 thread) takes for a float32 matrix-vector product over a matrix of
           the same byte size (best of a square, a tall and a wide shape)

Methods run interleaved in rounds of ``--steps`` steps; the table gives the best
round (the least disturbed by other tenants) and the median round, in us per step.
A tiny GRU 64->8 shows the fixed cost of one call. Then a pool of 64 streams against
one stream of batch 64 (GRU 64->256).
"""

from __future__ import annotations

import os

# numpy's BLAS reads these when it loads: set before the import so the floor is 1 thread.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import rnnedge  # noqa: E402

F32 = TensorProto.FLOAT


def build(kind: str, features: int, hidden: int, layers: int, seed: int = 0) -> tuple[bytes, int]:
    """(serialized model, weight bytes) of a time-major stack: input (time, batch, F),
    states (layers, batch, H), output (time, batch, H)."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3}[kind]
    names = [("h0", "hn"), ("c0", "cn")] if kind == "LSTM" else [("h0", "hn")]
    nodes, inits, weight_bytes = [], [], 0
    if layers > 1:  # one (1, batch, H) slice of each state per layer
        nodes += [helper.make_node("Split", [i], [f"{i}_{k}" for k in range(layers)], axis=0,
                                   num_outputs=layers) for i, _ in names]
    x, size = "input", features
    for layer in range(layers):
        arrays = {
            f"W{layer}": rng.standard_normal((1, gates * hidden, size)) * 0.1,
            f"R{layer}": rng.standard_normal((1, gates * hidden, hidden)) * 0.1,
            f"B{layer}": rng.standard_normal((1, 2 * gates * hidden)) * 0.1,
        }
        for name, arr in arrays.items():
            arr = arr.astype(np.float32)
            weight_bytes += arr.nbytes
            inits.append(numpy_helper.from_array(arr, name))
        ins = [x, f"W{layer}", f"R{layer}", f"B{layer}", ""]
        ins += [f"{i}_{layer}" if layers > 1 else i for i, _ in names]
        attrs = {"hidden_size": hidden}
        if kind == "GRU":
            attrs["linear_before_reset"] = 1
        outs = [f"Y{layer}"] + [f"{o}_{layer}" for _, o in names]
        nodes.append(helper.make_node(kind, ins, outs, **attrs))
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "ax1"], [f"y{layer}"]))
        x, size = f"y{layer}", hidden
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    nodes.append(helper.make_node("Identity", [x], ["output"]))
    for _, o in names:
        nodes.append(helper.make_node("Concat", [f"{o}_{k}" for k in range(layers)], [o], axis=0))
    sshape = [layers, "batch", hidden]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, kind,
        [vi("input", F32, ["time", "batch", features])] + [vi(i, F32, sshape) for i, _ in names],
        [vi("output", F32, ["time", "batch", hidden])] + [vi(o, F32, sshape) for _, o in names],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    meta = {
        "format": 1, "mode": "stream",
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["time", "batch", features]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["time", "batch", hidden]}],
        "states": [{"input": i, "output": o, "dtype": "float32", "shape": sshape, "batch_axis": 1,
                    "init": "zeros"} for i, o in names],
        "time_axis": 0, "opset": 18, "source": {"class": f"bench.{kind}", "torch": None}, "parity": {},
    }
    helper.set_model_props(model, {"rnnedge": json.dumps(meta)})
    onnx.checker.check_model(model)
    return model.SerializeToString(), weight_bytes


def loops(data: bytes, threads: int, batch: int = 1) -> dict:
    """{method: callable doing one step} over a fresh session/stream each."""
    model = rnnedge.load(data, device="cpu", threads=threads)
    sess = model.session
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, batch, model.contract.inputs[0].shape[2])).astype(np.float32)
    states = model.contract.states
    shapes = [s.shape_for(batch) for s in states]

    state = {s.input: np.zeros(shape, np.float32) for s, shape in zip(states, shapes)}
    out_names = ["output"] + [s.output for s in states]

    def plain():
        got = sess.run(out_names, {"input": x, **state})
        for s, value in zip(states, got[1:]):
            state[s.input] = value
        return got[0]

    io = sess.io_binding()
    bufs = [[ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for shape in shapes]
            for _ in (0, 1)]
    y = np.zeros((1, batch, model.contract.outputs[0].shape[2]), np.float32)
    io.bind_ortvalue_output("output", ort.OrtValue.ortvalue_from_numpy(y))

    def swap():
        io.bind_cpu_input("input", x)
        for s, a, b in zip(states, bufs[0], bufs[1]):
            io.bind_ortvalue_input(s.input, a)
            io.bind_ortvalue_output(s.output, b)
        sess.run_with_iobinding(io)
        bufs.reverse()
        return y.copy()

    stream = model.stream(batch=batch)

    def step():
        return stream.step(x)

    # The engine's own two bindings run bare: no input copy, no output copy, no checks.
    # What onnxruntime itself costs per step; no Python loop around it can be faster.
    bare = model.stream(batch=batch)
    bare.step(x)
    engine, slot = bare._engine, bare._slot

    def run_only():
        engine.run(slot)

    return {"plain": plain, "swap": swap, "stream": step, "run-only": run_only}


def gemv_floor(weight_bytes: int) -> dict:
    """{method: callable} of float32 GEMVs over matrices of ``weight_bytes`` bytes."""
    n = weight_bytes // 4
    side = int(n ** 0.5)
    rng = np.random.default_rng(2)
    out = {}
    for label, shape in (("square", (side, n // side)), ("tall", (n // 256, 256)),
                         ("wide", (256, n // 256))):
        w = rng.standard_normal(shape).astype(np.float32)
        v = rng.standard_normal(shape[1]).astype(np.float32)
        out[label] = (lambda w=w, v=v: w @ v)
    return out


def measure(fns: dict, rounds: int, steps: int) -> dict:
    """{name: [us per call for each round]}, methods interleaved round by round."""
    for fn in fns.values():  # warm-up: first-run allocations, caches
        for _ in range(steps):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps * 1e6)
    return times


def check_equal(fns: dict) -> None:
    """The three loops must compute the same thing (same start, same input)."""
    got = {name: [fns[name]() for _ in range(5)] for name in ("plain", "swap", "stream")}
    for name in ("swap", "stream"):
        for a, b in zip(got["plain"], got[name]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def bench_model(label, data, weight_bytes, args) -> dict:
    fns = loops(data, args.threads)
    check_equal(fns)
    fns = loops(data, args.threads)
    floors = gemv_floor(weight_bytes)
    times = measure({**fns, **floors}, args.rounds, args.steps)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_shape = min(floors, key=lambda k: best[k])
    row = {"model": label, "weight_MB": weight_bytes / 1e6, "floor_shape": floor_shape,
           "best": {k: best[k] for k in fns}, "median": {k: med[k] for k in fns}}
    row["best"]["floor"] = best[floor_shape]
    row["median"]["floor"] = med[floor_shape]
    row["gemv_GBps"] = weight_bytes / best[floor_shape] / 1e3
    return row


def bench_pool(data, args, batch=64) -> dict:
    model = rnnedge.load(data, device="cpu", threads=args.threads)
    features = model.contract.inputs[0].shape[2]
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((1, batch, features)).astype(np.float32)
    stream = model.stream(batch=batch)
    pool = model.pool()
    ids = [pool.add() for _ in range(batch)]
    feed = {sid: np.ascontiguousarray(xs[:, j:j + 1]) for j, sid in enumerate(ids)}
    times = measure({"stream_b64": lambda: stream.step(xs), "pool_64": lambda: pool.step(feed)},
                    max(5, args.rounds // 3), max(10, args.steps // 5))
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} intra-op thread(s), batch 1, one step per call; us per step, "
          f"best (median) of {args.rounds} rounds x {args.steps} steps")
    rows = []
    models = {"LSTM 2x64->256": ("LSTM", 2, 256), "GRU 1x64->256": ("GRU", 1, 256),
              "GRU 1x64->8": ("GRU", 1, 8)}  # the last: almost no work, so the fixed cost per call
    for label, (kind, layers, hidden) in models.items():
        data, weight_bytes = build(kind, 64, hidden, layers)
        rows.append(bench_model(label, data, weight_bytes, args))
    cols = ("plain", "swap", "stream", "run-only", "floor")
    head = f"{'model':<16}{'MB':>6}" + "".join(f"{c:>15}" for c in cols) + \
        f"{'stream/floor':>14}{'stream/swap':>13}{'plain/stream':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        b, m = r["best"], r["median"]
        cells = "".join(f"{b[k]:>8.1f} ({m[k]:>4.0f})" for k in cols)
        print(f"{r['model']:<16}{r['weight_MB']:>6.2f}{cells}{b['stream'] / b['floor']:>14.2f}"
              f"{b['stream'] / b['swap']:>13.2f}{b['plain'] / b['stream']:>14.2f}")
    for r in rows:
        print(f"floor for {r['model']}: {r['gemv_GBps']:.1f} GB/s GEMV ({r['floor_shape']} matrix)")
    pool = bench_pool(build("GRU", 64, 256, 1)[0], args)
    print(f"GRU batch 64, us per call: one stream of batch 64 {pool['stream_b64']:.1f}, "
          f"pool of 64 streams {pool['pool_64']:.1f} (gather/scatter + per-stream split)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "pool": pool}, fh, indent=1)


if __name__ == "__main__":
    main()
