"""``rnnedge verify``, ``rnnedge bench`` and ``rnnedge demo`` through the CLI (the ``cli`` fixture)."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch
from torch import nn

import rnnedge
from rnnedge.bench import ENGINES, weight_bytes

LSTM_KWARGS = {"input_size": 4, "hidden_size": 6, "num_layers": 2, "batch_first": True}
ARCH = ["--arch", "torch.nn:LSTM", "--arch-kwargs", json.dumps(LSTM_KWARGS)]
ROW_KEYS = {"engine", "batch", "chunk", "p50_us_per_step", "p90_us_per_step", "p99_us_per_step",
            "steps_per_s", "floor_us_per_step"}
FAST = ["--steps", "20", "--max-time", "0.02"]  # a handful of calls: the schema, not the figures


@pytest.fixture(scope="module")
def lstm(tmp_path_factory):
    """(graph path, state_dict path) of a tiny 2-layer LSTM, exported with the gate."""
    tmp = tmp_path_factory.mktemp("lstm")
    torch.manual_seed(0)
    model = nn.LSTM(**LSTM_KWARGS)
    torch.save(model.state_dict(), tmp / "model.pt")
    rnnedge.export(model, tmp / "model.onnx", example_input=torch.randn(2, 5, 4))
    return tmp / "model.onnx", tmp / "model.pt"


# --- verify -----------------------------------------------------------------------------------

def test_verify_passes_and_prints_every_tensor(cli, lstm):
    graph, weights = lstm
    result = cli("verify", graph, "--against", weights, *ARCH)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout
    for name in ("output", "hn", "cn", "full B=3 T=53", "stream B=1 T=53 chunks=1"):
        assert name in result.stdout


def test_verify_json(cli, lstm):
    graph, weights = lstm
    result = cli("verify", graph, "--against", weights, *ARCH, "--input-shape", "batch,time,4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["atol"] == 1e-5 and report["rtol"] == 1e-4  # the float32 defaults
    assert [t["name"] for t in report["tensors"]] == ["output", "hn", "cn"]
    assert all(t["passed"] and t["max_abs"] < 1e-5 for t in report["tensors"])
    assert len(report["cases"]) >= 10 and all(c["passed"] for c in report["cases"])


def test_verify_other_weights_fails_naming_the_misses(cli, lstm, tmp_path):
    graph, _ = lstm
    torch.manual_seed(1)
    torch.save(nn.LSTM(**LSTM_KWARGS).state_dict(), tmp_path / "other.pt")
    result = cli("verify", graph, "--against", tmp_path / "other.pt", *ARCH)
    assert result.exit_code == 1
    assert "MISS" in result.stdout
    # The per-tensor table names the case of the worst abs error, not of both figures.
    assert "worst abs in" in result.stdout and "worst case" not in result.stdout
    assert "parity failed" in result.stderr and "hn max abs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    as_json = cli("verify", graph, "--against", tmp_path / "other.pt", *ARCH, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["passed"] is False


def test_verify_loose_tolerance_passes_what_default_fails(cli, lstm, tmp_path):
    graph, _ = lstm
    torch.manual_seed(1)
    torch.save(nn.LSTM(**LSTM_KWARGS).state_dict(), tmp_path / "other.pt")
    result = cli("verify", graph, "--against", tmp_path / "other.pt", *ARCH, "--atol", "10")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kwargs", [{"hidden_size": 5}, {"input_size": 3}, {"num_layers": 1}])
def test_verify_against_a_model_of_another_shape_is_a_clear_error(cli, lstm, tmp_path, kwargs):
    graph, _ = lstm
    other = {**LSTM_KWARGS, **kwargs}
    torch.save(nn.LSTM(**other).state_dict(), tmp_path / "other.pt")
    result = cli("verify", graph, "--against", tmp_path / "other.pt",
                    "--arch", "torch.nn:LSTM", "--arch-kwargs", json.dumps(other))
    assert result.exit_code == 1
    assert "was not exported from this model" in result.stderr
    assert "Traceback" not in result.output


def test_verify_graph_without_metadata(cli, tmp_path, lstm):
    _, weights = lstm
    proto = onnx.load(str(lstm[0]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    result = cli("verify", tmp_path / "bare.onnx", "--against", weights, *ARCH)
    assert result.exit_code == 1
    assert "no rnnedge metadata" in result.stderr


def test_verify_int8_graph_uses_its_precision_gate(cli, lstm, tmp_path):
    _, weights = lstm
    torch.manual_seed(0)
    rnnedge.export(nn.LSTM(**LSTM_KWARGS), tmp_path / "q.onnx", example_input=torch.randn(2, 5, 4),
                   precision="int8")
    result = cli("verify", tmp_path / "q.onnx", "--against", weights, *ARCH, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == "int8" and report["atol"] > 1e-5  # not float32's tolerance
    assert any(c["name"].startswith("teacher-forced") for c in report["cases"])


def test_verify_needs_against(cli, lstm):
    result = cli("verify", lstm[0])
    assert result.exit_code == 2


# --- bench ------------------------------------------------------------------------------------

def test_bench_json_schema_with_eager(cli, lstm, tmp_path):
    graph, weights = lstm
    out = tmp_path / "bench.json"
    result = cli("bench", graph, "--against", weights, *ARCH, "--batch", "1,2", "--chunk", "1,4",
                    *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    assert "floor" in result.stdout and "mkldnn" in result.stdout
    data = json.loads(out.read_text())
    assert {"results", "floor_us_per_step", "machine", "versions"} <= set(data)
    assert data["floor_us_per_step"] > 0
    assert {"onnxruntime", "rnnedge", "torch"} <= set(data["versions"])
    got = {(r["engine"], r["batch"], r["chunk"]) for r in data["results"]}
    assert got == {(e, b, c) for e in ENGINES for b in (1, 2) for c in (1, 4)}
    for row in data["results"]:
        assert ROW_KEYS <= set(row)
        assert row["floor_us_per_step"] == data["floor_us_per_step"]
        assert 0 < row["p50_us_per_step"] <= row["p90_us_per_step"] <= row["p99_us_per_step"]
        assert row["steps_per_s"] > 0


def test_bench_without_model_runs_the_graph_engines_only(cli, lstm, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", lstm[0], "--chunk", "2", *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    engines = {r["engine"] for r in json.loads(out.read_text())["results"]}
    assert engines == {"rnnedge", "onnxruntime"}


def test_bench_step_graph_ignores_chunk(cli, tmp_path):
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 5)
    torch.save(cell.state_dict(), tmp_path / "cell.pt")
    rnnedge.export(cell, tmp_path / "cell.onnx", example_input=torch.randn(2, 3))
    out = tmp_path / "bench.json"
    result = cli("bench", tmp_path / "cell.onnx", "--against", tmp_path / "cell.pt", "--arch",
                    "torch.nn:GRUCell", "--arch-kwargs", '{"input_size": 3, "hidden_size": 5}',
                    "--chunk", "1,8", *FAST, "--json", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert {r["chunk"] for r in rows} == {1} and len(rows) == len(ENGINES)


def test_bench_plot_without_matplotlib_is_a_usage_error(cli, lstm, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = cli("bench", lstm[0], "--plot", tmp_path / "p.png", *FAST)
    assert result.exit_code == 2
    assert "rnnedge[plot]" in result.stderr
    assert "floor" not in result.stdout  # refused before measuring anything


@pytest.mark.slow
def test_bench_plot_with_matplotlib(cli, lstm, tmp_path):
    import matplotlib  # noqa: F401 - part of the test extra: the plot is tested for real
    result = cli("bench", lstm[0], "--chunk", "1,4", *FAST, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--chunk", "0"], "--chunk"),
    (["--batch", "1,x"], "--batch"),
    (["--engines", "eager"], "--against"),
    (["--engines", "turbo"], "unknown engine"),
])
def test_bench_usage_errors(cli, lstm, args, message):
    result = cli("bench", lstm[0], *args, *FAST)
    assert result.exit_code == 2
    assert message in result.stderr


def test_weight_bytes_are_the_float_weights(lstm):
    torch.manual_seed(0)
    params = sum(p.numel() for p in nn.LSTM(**LSTM_KWARGS).parameters())
    assert weight_bytes(onnx.load(str(lstm[0]))) == 4 * params


# --- demo -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_end_to_end(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--quick", "--budget", "0.5")
    assert result.exit_code == 0, result.output
    for name in ("model.pt", "forecaster.onnx", "bench.json", "report.json"):
        assert (out / name).is_file(), name
    text = result.stdout
    assert "parity" in text and "latency" in text and "RMSE" in text
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["passed"] is True
    assert report["forecast"]["stream_vs_eager_max_abs"] < 1e-4
    assert {r["engine"] for r in report["bench"]["results"]} == set(ENGINES)
    # The printed commands work on what was written.
    against = report["files"]["model" if report["export"]["full_model"] else "core"]
    again = cli("verify", out / "forecaster.onnx", "--against", against, *_arch_args(report))
    assert again.exit_code == 0, again.output


def _arch_args(report) -> list[str]:
    """--arch/--arch-kwargs from the demo's printed verify command."""
    cmd = report["commands"]["verify"]
    arch = cmd.split("--arch ")[1].split()[0]
    kwargs = cmd.split("--arch-kwargs ")[1].strip().strip("'")
    return ["--arch", arch, "--arch-kwargs", kwargs]
