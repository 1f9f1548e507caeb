"""A live Triton server (``rnnedge serve``, Python backend) streaming rnnedge graphs.

The server environment (nvidia-pytriton, numpy < 2, onnxruntime; ~370 MB) is provisioned
once into ``~/.cache/rnnedge`` (or $RNNEDGE_CACHE); these tests skip only when that cannot
be done (no network to the package index, a platform without the wheel), saying why.
Everything listens on 127.0.0.1, on ports the OS picks; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rnnedge.triton import server, server_env
from rnnedge.triton.python_backend import write_python_repository

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

IDLE_S = 2.0  # the served model's max_sequence_idle: short, for the expiry test
TIMEOUT = 30  # seconds any one request may take
NAME = "seq"


@pytest.fixture(scope="module")
def env():
    try:
        return server_env.provision()
    except server_env.ServerError as exc:
        pytest.skip(f"cannot provision the Triton server environment: {exc}")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """(eager time-major 2-layer LSTM, its rnnedge graph path): time-major, so the wire's
    batch-first rows are moved to the graph's layout and back by the served model."""
    import torch

    import rnnedge

    torch.manual_seed(0)
    model = torch.nn.LSTM(4, 8, num_layers=2).eval()
    path = tmp_path_factory.mktemp("graph") / f"{NAME}.onnx"
    rnnedge.export(model, path, example_input=torch.randn(3, 1, 4))
    return model, path


@pytest.fixture(scope="module")
def served(env, graph, tmp_path_factory):
    """``rnnedge serve`` running in a subprocess; yields its Ports."""
    ports = server.free_ports()
    tmp = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        [sys.executable, "-c", "from rnnedge.cli import main; main()", "serve", str(graph[1]),
         "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
         "--metrics-port", str(ports.metrics), "--idle-timeout", str(IDLE_S),
         "--max-batch", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp)})
    lines = _wait_for_line(process, "Ctrl-C to stop")
    assert f"serving model '{NAME}'" in lines and f"127.0.0.1:{ports.grpc}" in lines, lines
    yield ports, process, tmp
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _wait_for_line(process, text, timeout=120) -> str:
    """The output of ``process`` up to a line holding ``text`` (read by a thread: bounded)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        if text in seen[-1]:
            return "".join(seen)
    process.send_signal(signal.SIGTERM)  # serve stops its server on the way out
    process.wait(timeout=60)
    raise AssertionError(f"rnnedge serve did not print {text!r}: {''.join(seen)}")


def _wait_grpc(ports, timeout=30):
    """Until gRPC answers: this process's gRPC channel to a port that refused is in back-off."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client(ports).is_server_ready(client_timeout=2):
                return
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def client(ports):
    return grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")


def infer(c, x, sid, start=False, end=False, dtype="FP32"):
    """One step of sequence ``sid``: x (1, T, 4) batch-first over the wire -> y (1, T, 8)."""
    tensor = grpcclient.InferInput("input", list(x.shape), dtype)
    tensor.set_data_from_numpy(x)
    result = c.infer(NAME, [tensor], sequence_id=sid, sequence_start=start, sequence_end=end,
                     client_timeout=TIMEOUT)
    return result.as_numpy("output")


def eager(model, x):
    """Eager PyTorch on a whole batch-first sequence (1, T, 4) -> (1, T, 8)."""
    import torch

    with torch.no_grad():
        y, _ = model(torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))))
    return y.numpy().transpose(1, 0, 2)


def local_stream(path, chunks):
    """rnnedge.load(...).stream on the same chunks, batch-first in and out."""
    import rnnedge

    stream = rnnedge.load(path, device="cpu").stream(1)
    return np.concatenate([stream.step(np.ascontiguousarray(c.transpose(1, 0, 2))).transpose(1, 0, 2)
                           for c in chunks], axis=1)


def sequence(seed, steps):
    return np.random.default_rng(seed).standard_normal((1, steps, 4)).astype(np.float32)


def stats(ports):
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/{NAME}/stats",
                                timeout=5) as r:
        return json.loads(r.read())["model_stats"][0]


@pytest.mark.slow
def test_sixteen_concurrent_sequences_match_eager_and_the_local_stream(served, graph):
    ports = served[0]
    model, path = graph
    lengths = [3 + 2 * i for i in range(16)]  # 3..33 steps, so sequences end at different times
    before = stats(ports)

    def run(k):
        c, x = client(ports), sequence(100 + k, lengths[k])
        chunks = [x[:, t:t + 1] for t in range(x.shape[1])]  # one step per request
        ys = [infer(c, ch, 1000 + k, start=t == 0, end=t == len(chunks) - 1)
              for t, ch in enumerate(chunks)]
        return x, chunks, np.concatenate(ys, axis=1)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for x, chunks, y in results:
        np.testing.assert_allclose(y, eager(model, x), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(y, local_stream(path, chunks), atol=1e-6, rtol=1e-5)
    after = stats(ports)
    requests = after["inference_count"] - before["inference_count"]
    calls = after["execution_count"] - before["execution_count"]
    assert requests == sum(lengths)
    assert calls < requests, "the sequence batcher never put two streams in one call"


@pytest.mark.slow
def test_start_in_the_middle_of_a_sequence_resets_it(served, graph):
    c, (model, _) = client(served[0]), graph
    first, second = sequence(1, 5), sequence(2, 4)
    infer(c, first[:, :3], 7, start=True)
    infer(c, first[:, 3:], 7)
    y = infer(c, second[:, :2], 7, start=True)  # a new sequence under the same id
    y = np.concatenate([y, infer(c, second[:, 2:], 7, end=True)], axis=1)
    np.testing.assert_allclose(y, eager(model, second), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_an_idle_sequence_is_freed_and_its_id_starts_again_from_zeros(served, graph):
    c, (model, _) = client(served[0]), graph
    x = sequence(3, 4)
    infer(c, x[:, :2], 11, start=True)
    time.sleep(IDLE_S * 2)  # past max_sequence_idle: Triton drops it, the model frees it
    with pytest.raises(InferenceServerException, match="START"):
        infer(c, x[:, 2:], 11)  # its state is gone: an error, never a continuation from zeros
    y = infer(c, x, 11, start=True, end=True)
    np.testing.assert_allclose(y, eager(model, x), atol=1e-5, rtol=1e-4)


BAD = [
    ("wrong feature size", lambda x: x[:, :, :3].copy(), "FP32", "shape"),
    ("wrong dtype", lambda x: x.astype(np.float64), "FP64", "data-type|datatype|FP64|TYPE_FP64"),
    ("two rows in one request", lambda x: np.concatenate([x, x]), "FP32", "batch|row|shape"),
    ("NaN", lambda x: np.full_like(x, np.nan), "FP32", "NaN|finite"),
]


@pytest.mark.slow
@pytest.mark.parametrize("label, make, dtype, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_is_an_error_and_other_streams_go_on(served, graph, label, make, dtype,
                                                           message):
    c, (model, _) = client(served[0]), graph
    good, bad = sequence(4, 6), sequence(5, 2)
    ys = [infer(c, good[:, :3], 21, start=True)]
    infer(c, bad[:, :1], 22, start=True)
    with pytest.raises(InferenceServerException, match=message):
        infer(c, make(bad[:, 1:]), 22, dtype=dtype)
    ys.append(infer(c, good[:, 3:], 21, end=True))
    np.testing.assert_allclose(np.concatenate(ys, axis=1), eager(model, good), atol=1e-5, rtol=1e-4)
    # The bad request changed nothing: the sequence goes on from its first step's state.
    np.testing.assert_allclose(infer(c, bad[:, 1:], 22, end=True),
                               eager(model, bad)[:, 1:], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_an_unknown_sequence_without_start_is_an_error(served):
    c = client(served[0])
    with pytest.raises(InferenceServerException, match="START"):
        infer(c, sequence(6, 2), 424242)
    c.is_server_live()  # still serving


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(env, graph, tmp_path):
    ports = server.free_ports()
    process = subprocess.Popen(
        [sys.executable, "-c", "from rnnedge.cli import main; main()", "serve", str(graph[1]),
         "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
         "--metrics-port", str(ports.metrics), "--name", "other"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert "model 'other'" in _wait_for_line(process, "Ctrl-C to stop")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not _processes_mentioning(str(tmp_path)), "tritonserver or a stub outlived rnnedge serve"
    server.check_ports(ports, "127.0.0.1")  # all three free again


def _processes_mentioning(text: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_a_restarted_server_is_an_error_to_the_client_not_a_silent_reset(env, graph, tmp_path):
    model, path = graph
    repo = tmp_path / "repo"
    write_python_repository(repo, NAME, path.read_bytes(),
                            rnnedge_path=str(server_env.rnnedge_source()))
    ports = server.free_ports()
    running = server.start(env, repo, ports, log=tmp_path / "1.log")
    try:
        server.wait_ready(running, NAME, timeout=60)
        c, x = client(ports), sequence(7, 4)
        infer(c, x[:, :2], 5, start=True)
        os.killpg(running.process.pid, signal.SIGKILL)  # the server and its stubs, at once
        running.process.wait(timeout=30)
        with pytest.raises(InferenceServerException):
            infer(c, x[:, 2:], 5)  # nothing listening
        running = server.start(env, repo, ports, log=tmp_path / "2.log")
        server.wait_ready(running, NAME, timeout=60)
        _wait_grpc(ports)
        with pytest.raises(InferenceServerException, match="START"):
            infer(client(ports), x[:, 2:], 5)  # the state died with the server: said so
        y = infer(client(ports), x, 5, start=True, end=True)
        np.testing.assert_allclose(y, eager(model, x), atol=1e-5, rtol=1e-4)
    finally:
        server.stop(running)


# --- fast: the command's one-line errors, and the repository export writes -----------------


def test_serve_refuses_a_port_in_use_in_one_line(cli, tmp_path):
    import socket

    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"not read before the ports are checked")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = cli.one_error_line(cli("serve", graph, "--grpc-port", port), 2)
    assert f"port {port} (--grpc-port)" in line and "in use" in line


def test_serve_refuses_an_unsupported_platform_in_one_line(cli, tmp_path, monkeypatch):
    import platform

    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"x")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    line = cli.one_error_line(cli("serve", graph), 1)
    assert "needs Linux x86-64" in line and "aarch64" in line


def test_serve_refuses_a_missing_model_file(cli, tmp_path):
    line = cli.one_error_line(cli("serve", tmp_path / "none.onnx"), 2)
    assert "no model file" in line


def test_starting_without_a_server_binary_is_one_clear_error(tmp_path):
    with pytest.raises(server_env.ServerError, match="no tritonserver binary"):
        server.start(server_env.locate(tmp_path), tmp_path, server.free_ports())


@pytest.mark.slow
def test_export_writes_a_python_backend_repository(cli, tmp_path):
    """``rnnedge export --triton-backend python``: config parsed by Triton's own schema,
    the proven graph itself and model.py in version 1."""
    import torch
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import rnnedge

    torch.manual_seed(0)
    model = torch.nn.GRU(4, 8, batch_first=True)
    report = rnnedge.export(model, tmp_path / "g.onnx", example_input=torch.randn(1, 3, 4),
                            triton_repo=tmp_path / "repo", triton_backend="python")
    folder = report.triton
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.name == "g"
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [-1, 4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [-1, 8])]
    kinds = {c.name: c.control[0].kind for c in config.sequence_batching.control_input}
    assert set(kinds) == {"START", "END", "CORRID"}
    assert not config.sequence_batching.state  # the state stays in the model process
    assert (folder / "1" / "model.py").read_bytes().startswith(b'"""Triton Python-backend')
    served = rnnedge.load(folder / "1" / "model.onnx", device="cpu")
    assert served.metadata == rnnedge.load(tmp_path / "g.onnx", device="cpu").metadata
