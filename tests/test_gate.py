"""The parity gate through its public interfaces: ``rnnedge.gate``, ``rnnedge.export``,
``rnnedge.exporters.verify`` and ``rnnedge verify``.

- one run: verify runs the graph once (one session, each case once) and derives both the
  verdict and the per-tensor figures from it;
- every module's training flag is left as it was found, by export and by verify;
- ``max_rel`` is always a relative error; a reduced-precision graph's drift has its own key;
- the advice of a ParityError follows the kinds of the cases that failed;
- a graph with one weight perturbed fails.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import rnnedge
from rnnedge import gate
from rnnedge.errors import ParityError
from rnnedge.exporters.verify import raise_on_failure, verify
from rnnedge.gate.cases import chunk_spans
from tests.conftest import TINY_GRU

torch.set_num_threads(1)  # tiny models: threads only add noise and contention

GRU_ARCH = ["--arch", "torch.nn:GRU", "--arch-kwargs", json.dumps(TINY_GRU)]


class Net(nn.Module):
    """GRU -> dropout -> linear head: (batch, time, 4) -> (batch, time, 3)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(self.drop(y))


@pytest.fixture(scope="module")
def net_graph(tmp_path_factory):
    """(model, graph path) of a seeded ``Net`` exported in float32."""
    torch.manual_seed(0)
    model = Net().eval()
    path = tmp_path_factory.mktemp("net") / "net.onnx"
    rnnedge.export(model, path, example_input=torch.randn(1, 5, 4))
    return model, path


def flags(model: nn.Module) -> dict:
    return {name: m.training for name, m in model.named_modules()}


# (name, how the model's flags are set before the call)
FLAG_SETUPS = [
    ("all train", lambda m: m.train()),
    ("train, rnn frozen in eval", lambda m: (m.train(), m.rnn.eval())),
    ("eval, head left in train", lambda m: (m.eval(), m.head.train())),
]


@pytest.mark.slow
@pytest.mark.parametrize("setup", [s for _, s in FLAG_SETUPS], ids=[n for n, _ in FLAG_SETUPS])
@pytest.mark.parametrize("call", ["verify", "export"])
def test_training_flags_come_back_as_they_were(net_graph, tmp_path, setup, call):
    model, path = net_graph
    setup(model)
    before = flags(model)
    if call == "verify":
        report = verify(path, model)
        assert report.passed, report.failure_message()  # dropout was off while it ran
    else:
        rnnedge.export(model, tmp_path / "again.onnx", example_input=torch.randn(1, 5, 4))
    assert flags(model) == before


@pytest.fixture(scope="module")
def gru_files(tmp_path_factory):
    """(model, {precision: graph path} in fp32 and int8, its state_dict's path) of a seeded
    GRU of conftest's TINY_GRU shape: input (batch, time, 4)."""
    tmp = tmp_path_factory.mktemp("gru")
    torch.manual_seed(0)
    model = nn.GRU(**TINY_GRU).eval()
    weights = tmp / "gru.pt"
    torch.save(model.state_dict(), weights)
    graphs = {}
    for precision in ("fp32", "int8"):
        graphs[precision] = tmp / f"gru.{precision}.onnx"
        rnnedge.export(model, graphs[precision], example_input=torch.randn(1, 5, 4),
                       precision=precision)
    return model, graphs, weights


@pytest.mark.parametrize("precision,teacher_forced", [("fp32", 0), ("int8", 2)])
def test_verify_runs_the_graph_once(gru_files, monkeypatch, precision, teacher_forced):
    model, graphs, _ = gru_files
    import onnxruntime as ort

    sessions = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        sessions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    seen = []
    report = verify(graphs[precision], model, progress=seen.append)
    assert report.passed, report.failure_message()
    assert len(sessions) == 1  # one session: one run of the gate
    assert seen == [c.name for c in report.cases]  # each case once, in order
    assert len(set(seen)) == len(seen) == 13 + teacher_forced
    assert sum(c.case.kind == "teacher-forced" for c in report.cases) == teacher_forced
    # The per-tensor figures are the cases' own: the worst over them, tensor by tensor.
    for t in report.tensors:
        figures = [x for c in report.cases for x in c.tensors if x.name == t.name]
        assert len(figures) == len(report.cases)
        assert t.max_abs == max(x.max_abs for x in figures)
        assert t.max_rel == max(x.max_rel for x in figures)


@pytest.mark.parametrize("weights_seed,passes", [(None, True), (1, False)])
def test_verify_json_of_int8_reports_drift_apart_from_max_rel(cli, gru_files, tmp_path,
                                                               weights_seed, passes):
    _, graphs, weights = gru_files
    if weights_seed is not None:  # another model of the same shape: the graph must fail
        torch.manual_seed(weights_seed)
        weights = tmp_path / "other.pt"
        torch.save(nn.GRU(**TINY_GRU).state_dict(), weights)
    result = cli("verify", graphs["int8"], "--against", weights, *GRU_ARCH, "--json")
    assert result.exit_code == (0 if passes else 1), result.output
    report = json.loads(result.stdout)
    assert report["passed"] is passes and report["precision"] == "int8"
    assert report["drift_limit"] == gate.DRIFT["int8"]
    free = [c for c in report["cases"] if not c["name"].startswith("teacher-forced")]
    forced = [c for c in report["cases"] if c["name"].startswith("teacher-forced")]
    assert free and forced
    assert all(c["drift"] is not None for c in free) and all(c["drift"] is None for c in forced)
    assert report["drift"] == max(c["drift"] for c in free)
    assert (report["drift"] <= report["drift_limit"]) is passes

    # max_rel is the relative error the float32 gate computes on the same cases (same
    # seed, same order), never the drift: run that gate on the same plan and graph.
    model = nn.GRU(**TINY_GRU)
    model.load_state_dict(torch.load(weights))
    plan = verify(graphs["int8"], model).plan
    plain = gate.run_gate(plan, graphs["int8"].read_bytes(), gate.policy_for("fp32"))
    rel = {c.name: {t.name: t.max_rel for t in c.tensors} for c in plain.cases}
    assert len(plain.cases) == len(free)
    for case in free:
        assert case["max_rel"] == pytest.approx(max(rel[case["name"]].values()), rel=1e-12)
        for miss in case["misses"]:
            assert miss["max_rel"] == pytest.approx(rel[case["name"]][miss["tensor"]], rel=1e-12)
            assert miss["drift"] > report["drift_limit"]
        assert bool(case["misses"]) is not case["passed"]
    for t in report["tensors"]:  # their worst includes the teacher-forced steps too
        assert t["drift"] is not None
        assert t["max_rel"] >= max(rel[c][t["name"]] for c in rel)


# --- advice, built from the kinds of the failed cases ------------------------------------------

def case_result(case: gate.Case, passed: bool, drift: float | None = None) -> gate.CaseResult:
    err = 0.0 if passed else 0.5
    tensors = (gate.TensorResult("output", "output", err, err, passed, drift),
               gate.TensorResult("hn", "state", 0.0, 0.0, True, drift and 0.0))
    return gate.CaseResult(case, tensors)


def full(length: int, batch: int = 1) -> gate.Case:
    return gate.Case("full", batch, length)


STREAMS = [gate.Case("stream", b, 53, b > 1, c) for b in (1, 3) for c in ((1,), (5, 1, 12))]
FULLS = [full(t, b) for b in (1, 3) for t in (1, 7, 10, 53)]
TEACHER = [gate.Case("teacher-forced", b, 53, b > 1) for b in (1, 3)]
LONG_STREAM = gate.Case("stream", 1, 1000, False, (37, 23, 41))

# The distinctive phrase of each piece of advice: a message holds exactly one.
ADVICE_KEYS = ("Whole sequences match", "matches at some lengths", "tiny (within 10x",
               "differences are large", "a length was baked", "sensitive to int8",
               "Single steps already differ")
# (name, policy, [(case, passed[, drift])], its advice's key, texts the message must hold)
ADVICE = [
    ("streaming only", gate.policy_for("fp32"),
     [(c, True) for c in FULLS] + [(c, c.chunks == (1,)) for c in STREAMS],
     "Whole sequences match", ["2 of 12 cases", "Whole sequences match but chunked streaming does not",
      "depends on the whole sequence or on the position in it (global or cumulative "
      "normalisation, pooling, a bidirectional layer)", "mode='sequence' (--mode sequence)", "[stream B=1 T=53 chunks=5,1,12: output max_abs=0.5 max_rel=0.5]"]),
    ("some lengths", gate.policy_for("fp32"),
     [(c, c.length in (1, 7)) for c in FULLS] + [(c, False) for c in STREAMS],
     "matches at some lengths", ["8 of 12 cases", "matches at some lengths only (T=1,7)", "Python loop over time"]),
    ("everything, by far", gate.policy_for("fp32"),
     [(c, False) for c in FULLS + STREAMS],
     "differences are large", ["12 of 12 cases", "output max_abs=0.5 max_rel=0.5",
                               "worst max_abs 0.5"]),
    ("everything, by a little", gate.policy_for("fp32", atol=0.1, rtol=0.1),
     [(c, False) for c in FULLS + STREAMS],
     "tiny (within 10x", ["12 of 12 cases", "loosen atol/rtol"]),
    ("long lengths only", gate.policy_for("fp32"),
     [(c, True) for c in FULLS + STREAMS] + [(full(2000), False), (LONG_STREAM, False)],
     "a length was baked", ["2 of 14 cases", "matches up to T=53 but not at T=1000,2000",
                            "--max-length"]),
    ("int8 drift only", gate.policy_for("int8"),
     [(c, True, 0.1) for c in FULLS] + [(c, False, 0.4) for c in STREAMS] + [(c, True) for c in TEACHER],
     "sensitive to int8", ["int8 parity gate failed: 4 of 14 cases", "drift <= 0.25",
      "[stream B=3 T=53 chunks=1: output drift=0.4 (max_abs=0.5)]",
      "sensitive to int8 rounding", "rnnedge.precision.agreement"]),
    ("int8 steps too", gate.policy_for("int8"),
     [(c, False, 0.4) for c in FULLS] + [(c, c.batch == 1) for c in TEACHER],
     "Single steps already differ", ["int8 parity gate failed: 9 of 10 cases", "Single steps already differ beyond atol=0.05",
      "[teacher-forced B=3 N=53: output max_abs=0.5 max_rel=0.5]"]),
]


@pytest.mark.parametrize("policy,rows,key,texts", [a[1:] for a in ADVICE], ids=[a[0] for a in ADVICE])
def test_advice_follows_the_kinds_of_the_failed_cases(policy, rows, key, texts):
    result = gate.GateResult(policy, tuple(case_result(*row) for row in rows))
    with pytest.raises(ParityError) as info:
        gate.raise_on_failure(result)
    message = str(info.value)
    for text in texts:
        assert text in message
    assert [k for k in ADVICE_KEYS if k in message] == [key], message
    assert info.value.failures == result.failed and "\n" not in message


def test_a_passing_result_raises_nothing_and_summarizes():
    result = gate.GateResult(gate.policy_for("fp32"), tuple(case_result(c, True) for c in FULLS))
    gate.raise_on_failure(result)
    assert gate.summarize(result) == {"max_abs": 0.0, "max_rel": 0.0, "cases": 8,
                                      "referee": "float32", "nan_propagates": None}
    reduced = gate.GateResult(gate.policy_for("int8"),
                              tuple(case_result(c, True, 0.1) for c in FULLS))
    assert gate.summarize(reduced, "cpu") == {
        "max_abs": 0.0, "max_rel": 0.0, "cases": 8, "referee": "float32",
        "nan_propagates": None, "precision": "int8", "device": "cpu",
        "atol": 0.05, "rtol": 0.05, "drift": 0.1, "drift_limit": 0.25}


def test_summarize_takes_the_referee_figures_from_the_cases_that_ran():
    def refereed(case, ref, eager):
        return gate.CaseResult(case, (gate.TensorResult("output", "output", 0.0, 0.0, True,
                                                        None, ref, eager),))

    rows = (refereed(full(1), 1e-7, 2e-7), refereed(full(7), 3e-7, 1e-7),
            gate.CaseResult(full(2000), (), "the model raised RuntimeError: too long", "model"))
    summary = gate.summarize(gate.GateResult(gate.policy_for("fp32"), rows))
    assert summary["referee"] == "float64" and summary["cases"] == 3
    assert (summary["ref_max_abs"], summary["eager_max_abs"]) == (3e-7, 2e-7)


def test_case_grid_follows_the_plan(tiny_gru):
    from rnnedge.exporters.api import make_plan

    stream = make_plan(tiny_gru, torch.randn(1, 5, 4), "stream", 18, None)
    cases = gate.gate_cases(stream)
    assert [c.kind for c in cases] == ["full"] * 8 + ["stream"] * 5
    assert {c.length for c in cases if c.kind == "full"} == {1, 7, 10, 53}
    long = cases[-1]  # one long streamed run, at batch 1, in uneven chunks of a few dozen
    assert (long.batch, long.length) == (1, gate.DEFAULT_MAX["stream"])
    assert len(set(long.chunks)) > 1 and all(20 <= c <= 60 for c in long.chunks)
    sequence = make_plan(nn.GRU(4, 8, bidirectional=True), torch.randn(5, 1, 4), "sequence", 18, True)
    cases = gate.gate_cases(sequence, ((1, 53),))
    assert [c.kind for c in cases] == ["full"] * 9 + ["lengths"] * 2 + ["teacher-forced"]
    assert (cases[8].batch, cases[8].length) == (1, gate.DEFAULT_MAX["sequence"])
    assert all(c.lengths == "random" for c in cases if c.kind == "lengths")
    cell = make_plan(nn.GRUCell(4, 8), torch.randn(1, 4), "stream", 18, None)
    steps = gate.gate_cases(cell)
    assert {c.kind for c in steps} == {"steps"} and {c.batch for c in steps} == {1, 3}
    assert len({c.length for c in steps}) >= 3 and {c.random_state for c in steps} == {True, False}


@pytest.mark.parametrize("mode,low,high,lengths", [
    ("sequence", 1000, None, [1000, 1006, 1009, 1052, 3000]),
    ("sequence", None, 20, [1, 7, 10, 20]),
    ("sequence", 5, 5, [5]),
    ("stream", 100, 400, [100, 106, 109, 152, 400]),
])
def test_every_length_is_in_range(tiny_gru, mode, low, high, lengths):
    from rnnedge.exporters.api import make_plan

    plan = make_plan(tiny_gru, torch.randn(1, 5, 4), mode, 18, None)
    span = gate.policy_for(min_length=low, max_length=high).span(mode)
    cases = gate.gate_cases(plan, (), span)
    assert sorted({c.length for c in cases if c.kind == "full"}) == lengths
    for c in cases:
        assert span.low <= c.length <= span.high
        if c.chunks:  # every call, last chunk included, within range too
            sizes = [b - a for a, b in chunk_spans(c.length, c.chunks, c.least)]
            assert all(span.low <= n for n in sizes), sizes


# --- a broken graph fails ----------------------------------------------------------------------

def perturbed(path, tmp_path, which: int, delta: float):
    """A copy of the graph at ``path`` with element 0 of its ``which``-th float weight moved
    by ``delta``."""
    model = onnx.load(path)
    floats = [t for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).size > 1]
    init = floats[which]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    out = tmp_path / "broken.onnx"
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("which", [0, 1, -1])
@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_a_perturbed_weight_fails(gru_files, tmp_path, which, delta):
    model, graphs, _ = gru_files
    graph = perturbed(graphs["fp32"], tmp_path, which, delta)
    report = verify(graph, model)
    assert not report.passed and report.failed
    assert any(not t.passed for t in report.tensors)
    with pytest.raises(ParityError, match="parity failed: .* does not equal the model"):
        raise_on_failure(report)
    untouched = verify(graphs["fp32"], model)  # the control passes
    assert untouched.passed and np.isfinite(untouched.max_abs)
