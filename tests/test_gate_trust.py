"""A parity gate users can trust at the lengths they run (issue 10, the gate's half).

- isolation: models that update their state or input in place export and stream equal
  to eager over 50+ steps;
- the float64 referee: a LayerNorm-LSTM streamed 500 steps passes the default gate, and
  the same graph with one weight moved by 1e-3 fails it;
- min_length: a model that needs 1,000 samples exports with min_length=1000, and says
  how without it;
- errors name the culprit: the model's exception is the model's;
- min_length / max_length are checked as usage errors (API and CLI, exit 2).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import rnnedge
from rnnedge import gate
from rnnedge.errors import ParityError, UsageError
from rnnedge.exporters.verify import raise_on_failure, verify
from tests.conftest import TINY_GRU

torch.set_num_threads(1)  # tiny models: threads only add noise and contention


class InPlaceStateCell(nn.Module):
    """A GRUCell step model whose state (h, acc) is updated in place: ``acc += h``.
    Input (batch, 4); output (batch, 8); state ((batch, 8), (batch, 8))."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(4, 8)

    def init_state(self, batch_size: int):
        return torch.zeros(batch_size, 8), torch.zeros(batch_size, 8)

    def forward(self, x, state):
        h, acc = state
        h = self.cell(x, h)
        acc += h  # in place, as Tacotron2's attention_weights_cum += ...
        return acc * 0.5, (h, acc)


class InPlaceInputLSTM(nn.Module):
    """An LSTM model that scales its input in place: (batch, time, 4) -> (batch, time, 3)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x.mul_(0.5)
        y, _ = self.lstm(x)
        return self.head(y)


def eager_stream(model, xs, state):
    """Eager outputs of ``model`` stepped over ``xs``, on deep copies of inputs and state."""
    outs = []
    for x in xs:
        y, state = model(x.clone(), copy.deepcopy(state))
        outs.append(y)
    return outs


IN_PLACE = [
    ("state acc += h", InPlaceStateCell, (2, 4), 60),
    ("input x.mul_(0.5)", InPlaceInputLSTM, (2, 5, 4), 12),
]


@pytest.mark.parametrize("make,shape,calls", [c[1:] for c in IN_PLACE], ids=[c[0] for c in IN_PLACE])
def test_in_place_models_stream_equal_to_eager(tmp_path, make, shape, calls):
    torch.manual_seed(0)
    model = make().eval()
    path = tmp_path / "m.onnx"
    report = rnnedge.export(model, path, example_input=torch.randn(*shape), mode="stream")
    assert report.metadata["parity"]["referee"] == "float64"
    stream = rnnedge.load(path, device="cpu").stream(batch=shape[0])
    torch.manual_seed(1)
    xs = [torch.randn(*shape) for _ in range(calls)]
    got = [stream.step(x.numpy().copy()) for x in xs]
    with torch.no_grad():
        if isinstance(model, InPlaceStateCell):
            want = eager_stream(model, xs, model.init_state(shape[0]))
        else:  # the whole sequence at once, on a copy: eager's in-place op stays its own
            want = list(model(torch.cat(xs, dim=1).clone()).split(shape[1], dim=1))
    assert sum(x.shape[1] if x.dim() == 3 else 1 for x in xs) >= 50
    for g, w in zip(got, want):
        g = g if isinstance(g, np.ndarray) else next(iter(g.values()))
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-4)


# --- the float64 referee -----------------------------------------------------------------------

class LayerNormLSTM(nn.Module):
    """Linear -> LSTM -> LayerNorm -> Linear (an RNN-T predictor's shape): (B, T, 6) -> (B, T, 5)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        y, _ = self.lstm(self.inp(x))
        return self.out(self.norm(y))


@pytest.fixture(scope="module")
def layernorm_graph(tmp_path_factory):
    """(model, graph path) of a seeded LayerNormLSTM exported with streaming up to 500 steps."""
    torch.manual_seed(0)
    model = LayerNormLSTM().eval()
    path = tmp_path_factory.mktemp("ln") / "ln.onnx"
    report = rnnedge.export(model, path, example_input=torch.randn(1, 5, 6), max_length=500)
    return model, path, report


def test_layernorm_lstm_streamed_500_steps_passes_against_float64(layernorm_graph):
    _, _, report = layernorm_graph
    parity = report.metadata["parity"]
    assert parity["referee"] == "float64"
    assert parity["max_length"] == 500 and parity["min_length"] == 1
    assert parity["nan_propagates"] in (True, False)
    assert parity["eager_max_abs"] > 0 and parity["ref_max_abs"] > 0  # both figures reported
    streamed = [c for c in report.cases if c.case.kind == "stream" and c.case.length == 500]
    assert len(streamed) == 1 and streamed[0].refereed
    assert len(set(streamed[0].case.chunks)) > 1  # uneven chunks
    assert all(c.passed for c in report.cases)


@pytest.mark.parametrize("which", [0, 2, -1])
def test_one_weight_moved_by_1e_3_fails_the_same_gate(layernorm_graph, tmp_path, which):
    model, path, _ = layernorm_graph
    proto = onnx.load(path)
    floats = [t for t in proto.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).size > 1]
    arr = numpy_helper.to_array(floats[which]).copy()
    arr.flat[0] += 1e-3
    floats[which].CopyFrom(numpy_helper.from_array(arr, floats[which].name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    report = verify(broken, model, max_length=500)
    assert not report.passed
    assert verify(path, model, max_length=500).passed  # the control passes


# --- lengths -----------------------------------------------------------------------------------

class NeedsLongInput(nn.Module):
    """An LSTM model that refuses inputs under 1,000 samples: (B, T, 2) -> (B, T, 4)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 4, batch_first=True)

    def forward(self, x):
        if x.shape[1] < 1000:
            raise ValueError(f"need at least 1000 samples, got {x.shape[1]}")
        return self.lstm(x)[0]


@pytest.mark.parametrize("mode", ["stream", "sequence"])
def test_a_model_with_a_minimum_length_exports_with_min_length(tmp_path, mode):
    torch.manual_seed(0)
    model = NeedsLongInput().eval()
    path = tmp_path / "long.onnx"
    report = rnnedge.export(model, path, example_input=torch.randn(1, 1000, 2), mode=mode,
                            min_length=1000)
    assert all(c.case.length >= 1000 for c in report.cases)
    assert report.metadata["parity"]["min_length"] == 1000
    m = rnnedge.load(path, device="cpu")
    x = np.random.default_rng(0).standard_normal((1, 1203, 2)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x.copy())).numpy()
    got = m.stream(batch=1).step(x)
    got = got if isinstance(got, np.ndarray) else next(iter(got.values()))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_without_min_length_the_message_says_what_to_give(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(UsageError, match=r"need at least 1000 samples.*--min-length") as info:
        rnnedge.export(NeedsLongInput().eval(), tmp_path / "x.onnx",
                       example_input=torch.randn(1, 1000, 2))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.onnx").exists()


class RaisesPastLength(nn.Module):
    """A GRU model that raises on inputs longer than 60 steps, in eager PyTorch only (the
    trace does not see it: only the gate's eager run can raise)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)

    def forward(self, x):
        if not torch.compiler.is_compiling() and x.shape[1] > 60:
            raise RuntimeError("positional table holds 60 steps")
        return self.gru(x)[0]


def test_an_exception_raised_by_eager_in_the_gate_is_the_models(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ParityError) as info:
        rnnedge.export(RaisesPastLength().eval(), tmp_path / "x.onnx",
                       example_input=torch.randn(1, 5, 4), mode="sequence")
    message = str(info.value)
    assert "the model raised RuntimeError: positional table holds 60 steps at batch 1, length 2000" in message
    assert "not the graph's" in message and "--max-length" in message
    assert "graph failed to run" not in message and "\n" not in message
    # With the lengths it takes, it exports.
    rnnedge.export(RaisesPastLength().eval(), tmp_path / "x.onnx",
                   example_input=torch.randn(1, 5, 4), mode="sequence", max_length=60)


def test_verify_says_an_exception_raised_by_eager_is_the_models(tmp_path):
    torch.manual_seed(0)
    model = RaisesPastLength().eval()
    path = tmp_path / "x.onnx"
    rnnedge.export(model, path, example_input=torch.randn(1, 5, 4), mode="sequence",
                   max_length=60)
    report = verify(path, model)  # its default lengths go past 60
    assert not report.passed
    with pytest.raises(ParityError) as info:
        raise_on_failure(report)
    message = str(info.value)
    assert "the model raised RuntimeError: positional table holds 60 steps" in message
    assert "the model's error, not the graph's" in message and "--max-length" in message
    assert "does not equal the model" not in message and "\n" not in message
    assert verify(path, model, max_length=60).passed  # the control passes


BAD_RANGES = [
    ("min above max", {"min_length": 10, "max_length": 5}, "min_length 10 is above max_length 5"),
    ("max below 1", {"max_length": 0}, "max_length (--max-length) must be between 1"),
    ("min below 1", {"min_length": -3}, "min_length (--min-length) must be between 1"),
    ("not an integer", {"max_length": 2.5}, "must be a whole number"),
    ("a bool", {"min_length": True}, "must be a whole number"),
]


@pytest.mark.parametrize("kwargs,text", [b[1:] for b in BAD_RANGES], ids=[b[0] for b in BAD_RANGES])
def test_bad_length_ranges_are_usage_errors(tiny_gru, tmp_path, kwargs, text):
    with pytest.raises(UsageError, match=text.replace("(", r"\(").replace(")", r"\)")):
        rnnedge.export(tiny_gru, tmp_path / "x.onnx", example_input=torch.randn(1, 5, 4), **kwargs)
    with pytest.raises(UsageError, match="min_length|max_length"):
        gate.policy_for(**kwargs)


CLI_BAD = [
    ("min above max", ["--min-length", "10", "--max-length", "5"], "above max_length"),
    ("max below 1", ["--max-length", "0"], "between 1"),
    ("not an integer", ["--min-length", "ten"], "ten"),
]


@pytest.mark.parametrize("command", ["export", "verify"])
@pytest.mark.parametrize("args,text", [c[1:] for c in CLI_BAD], ids=[c[0] for c in CLI_BAD])
def test_cli_length_options_are_usage_errors(cli, tmp_path, command, args, text):
    weights = tmp_path / "gru.pt"
    torch.save(nn.GRU(**TINY_GRU).state_dict(), weights)
    arch = ["--arch", "torch.nn:GRU", "--arch-kwargs", json.dumps(TINY_GRU)]
    if command == "export":
        result = cli("export", weights, "-o", tmp_path / "g.onnx", *arch, *args)
    else:
        result = cli("verify", tmp_path / "missing.onnx", "--against", weights, *arch, *args)
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert not (tmp_path / "g.onnx").exists()
