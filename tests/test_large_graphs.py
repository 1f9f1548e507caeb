"""Graphs over the external-data threshold: ``NAME.onnx`` plus ``NAME.onnx.data``, end to end.

The threshold is lowered with RNNEDGE_EXTERNAL_DATA_THRESHOLD, so tiny layers take the
route a >2 GiB layer takes: weights staged beside the destination, checked and gated by
path, renamed into place both or neither. Models over the real 2 GiB are described on the
meta device (nothing allocated) for the refusals.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rnnedge
from rnnedge.errors import UsageError

ENV = "RNNEDGE_EXTERNAL_DATA_THRESHOLD"

# (name, layer, example input): bare layers, built by GraphBuilder, over a 1 KiB threshold.
LAYERS = [
    ("lstm2_batch_first", lambda: nn.LSTM(4, 16, num_layers=2, batch_first=True), (1, 5, 4)),
    ("gru_time_major", lambda: nn.GRU(3, 24), (5, 1, 3)),
    ("rnn_relu", lambda: nn.RNN(3, 32, nonlinearity="relu", batch_first=True), (1, 5, 3)),
]


@pytest.fixture()
def small_threshold(monkeypatch):
    monkeypatch.setenv(ENV, "1024")


def files(folder: Path) -> dict:
    """{name: bytes} of everything in ``folder``, hidden files included."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def streamed(path: Path, x: np.ndarray, time_axis: int, chunks=(2, 1, 4)) -> np.ndarray:
    """``x`` streamed through the graph at ``path`` in chunks along ``time_axis``."""
    stream = rnnedge.load(path, device="cpu").stream(batch=1)
    bounds = np.cumsum((0, *chunks))
    parts = [stream.step(np.take(x, range(a, b), axis=time_axis)) for a, b in zip(bounds, bounds[1:])]
    return np.concatenate(parts, axis=time_axis)


def export(layer, path: Path, shape, **kwargs):
    return rnnedge.export(layer, path, example_input=torch.randn(*shape), max_length=20, **kwargs)


@pytest.mark.parametrize(("name", "make", "shape"), LAYERS, ids=[r[0] for r in LAYERS])
def test_layer_over_threshold_is_a_pair_that_streams_like_eager(tmp_path, small_threshold, name,
                                                                 make, shape):
    torch.manual_seed(0)
    layer = make()
    out = tmp_path / "g.onnx"
    report = export(layer, out, shape)
    data = tmp_path / "g.onnx.data"
    assert sorted(os.listdir(tmp_path)) == ["g.onnx", "g.onnx.data"]  # no stage left behind
    assert data.stat().st_size > out.stat().st_size  # the weights went out
    assert report.graph["bytes"] == data.stat().st_size + out.stat().st_size
    graph = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"g.onnx.data"}  # relative: right wherever the pair is moved to

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in (out, data):
        shutil.move(f, moved / f.name)
    time_axis = 1 if layer.batch_first else 0
    x = np.random.default_rng(1).standard_normal(
        [7 if i == time_axis else n for i, n in enumerate(shape)]).astype(np.float32)
    with torch.no_grad():
        want = layer(torch.from_numpy(x))[0].numpy()
    got = streamed(moved / "g.onnx", x, time_axis)
    assert np.abs(got - want).max() < 1e-5


def test_verify_and_inspect_read_the_pair(cli, tmp_path, small_threshold):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16, num_layers=2, batch_first=True)
    out = tmp_path / "g.onnx"
    export(lstm, out, (1, 5, 4))
    assert (tmp_path / "g.onnx.data").is_file()
    shown = cli("inspect", out, "--json")
    assert shown.exit_code == 0, shown.output
    meta = json.loads(shown.stdout)
    assert [s["input"] for s in meta["states"]] == ["h0", "c0"]
    torch.save(lstm.state_dict(), tmp_path / "m.pt")
    kwargs = json.dumps({"input_size": 4, "hidden_size": 16, "num_layers": 2, "batch_first": True})
    verified = cli("verify", out, "--against", tmp_path / "m.pt", "--arch", "torch.nn:LSTM",
                   "--arch-kwargs", kwargs, "--max-length", "20")
    assert verified.exit_code == 0 and "verified: g.onnx equals" in verified.stdout, verified.output
    # The graph without its data file is not a graph: load says so instead of running.
    (tmp_path / "g.onnx.data").unlink()
    with pytest.raises(rnnedge.errors.RnnedgeError):
        rnnedge.load(out, device="cpu")


def test_reexport_over_a_pair_replaces_both(tmp_path, small_threshold):
    out, data = tmp_path / "g.onnx", tmp_path / "g.onnx.data"
    torch.manual_seed(0)
    first = nn.GRU(3, 12, batch_first=True)
    export(first, out, (1, 5, 3))
    before = files(tmp_path)
    torch.manual_seed(1)
    second = nn.GRU(3, 12, batch_first=True)
    export(second, out, (1, 5, 3))
    after = files(tmp_path)
    assert sorted(after) == ["g.onnx", "g.onnx.data"]
    assert after["g.onnx.data"] != before["g.onnx.data"] and after["g.onnx"] != before["g.onnx"]
    x = np.random.default_rng(2).standard_normal((1, 7, 3)).astype(np.float32)
    with torch.no_grad():
        want = second(torch.from_numpy(x))[0].numpy()
    assert np.abs(streamed(out, x, 1) - want).max() < 1e-5
    assert data.stat().st_size > 0


def _full_disk_at(monkeypatch, where):
    """os.replace refuses (ENOSPC) renames onto a path for which ``where(path)`` holds."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if where(Path(dst)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


# Where the write fails: staging the weights (onnx_ir's own atomic write into the hidden
# stage folder), renaming the data file into place, renaming the graph file after it.
FAILURES = {
    "staging": lambda p: p.name == "g.onnx.data" and p.parent.name.startswith(".g.onnx."),
    "data_rename": lambda p: p.name == "g.onnx.data" and not p.parent.name.startswith("."),
    "graph_rename": lambda p: p.name == "g.onnx" and not p.parent.name.startswith("."),
}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over_a_pair"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_write_leaves_neither_file(tmp_path, small_threshold, monkeypatch, failure, existing):
    torch.manual_seed(0)
    gru = nn.GRU(3, 12, batch_first=True)
    out = tmp_path / "g.onnx"
    if existing:
        export(gru, out, (1, 5, 3))
        torch.manual_seed(1)
        gru = nn.GRU(3, 12, batch_first=True)
    before = files(tmp_path)
    _full_disk_at(monkeypatch, FAILURES[failure])
    with pytest.raises(UsageError) as caught:
        export(gru, out, (1, 5, 3))
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message
    assert "nothing was written" in message
    assert files(tmp_path) == before  # the old pair byte for byte, or nothing; no temp files
    assert os.listdir(tmp_path) == list(before)


def test_reduced_precision_under_2_gib_is_read_back_and_written_as_a_pair(tmp_path, small_threshold):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16, batch_first=True)
    out = tmp_path / "g.onnx"
    report = export(lstm, out, (1, 5, 4), precision="int8")
    assert report.precision == "int8"
    assert sorted(os.listdir(tmp_path)) == ["g.onnx", "g.onnx.data"]
    x = np.random.default_rng(3).standard_normal((1, 7, 4)).astype(np.float32)
    with torch.no_grad():
        want = lstm(torch.from_numpy(x))[0].numpy()
    assert np.abs(streamed(out, x, 1) - want).max() < 0.1  # int8 weights


def _whole(layer):
    return nn.Sequential(layer)


# Over the real 2 GiB, on the meta device (8 GiB described, nothing allocated): the routes
# that hold one in-memory protobuf are refused before any work, with one line.
REFUSED = [
    ("whole_model", _whole, {}, "a whole model is traced by torch.onnx"),
    ("int8", lambda m: m, {"precision": "int8"}, "exported in float32 only (int8 conversion"),
    ("fp16", lambda m: m, {"precision": "fp16"}, "exported in float32 only (fp16 conversion"),
    ("triton", lambda m: m, {"triton_repo": "repo"}, "without a Triton repository"),
]


@pytest.mark.parametrize(("name", "wrap", "kwargs", "expected"), REFUSED, ids=[r[0] for r in REFUSED])
def test_over_2_gib_routes_that_hold_one_protobuf_are_refused_early(tmp_path, name, wrap, kwargs,
                                                                   expected):
    big = wrap(nn.LSTM(16384, 16384, batch_first=True, device="meta"))
    if "triton_repo" in kwargs:
        kwargs = {"triton_repo": tmp_path / "repo"}
    with pytest.raises(UsageError) as caught:
        rnnedge.export(big, tmp_path / "big.onnx",
                       example_input=torch.zeros(1, 2, 16384, device="meta"), **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "weights take 8.0 GiB" in message and expected in message
    assert os.listdir(tmp_path) == []
