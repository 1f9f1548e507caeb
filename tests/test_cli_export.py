"""`rnnedge export` / `rnnedge inspect` through click's runner: forms, errors, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests import ortref

# The conftest's tiny_lstm.
LSTM_KW = {"input_size": 6, "hidden_size": 10, "num_layers": 2, "batch_first": True}


@pytest.fixture()
def state_dict(tmp_path, tiny_lstm):
    path = tmp_path / "lstm_sd.pt"
    torch.save({"epoch": 3, "state_dict": tiny_lstm.state_dict()}, path)
    return path


def test_export_pickled_module_with_trust(cli, tmp_path, tiny_lstm_file):
    out = tmp_path / "out.onnx"
    result = cli("export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (") and "parity 13 cases passed" in result.stdout
    assert ortref.contract(out)["inputs"][0]["shape"] == ["batch", "time", 6]


def test_pickle_without_trust_is_refused(cli, tmp_path, tiny_lstm_file):
    out = tmp_path / "out.onnx"
    line = cli.one_error_line(cli("export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6"), 2)
    assert "runs code" in line and "--trust-pickle" in line and "state_dict" in line
    assert not out.exists()


@pytest.mark.parametrize("arch_kwargs,code,pattern", [
    (LSTM_KW, 0, "wrote"),
    ({**LSTM_KW, "hidden_size": 12}, 2, "shape mismatch.*weight_ih_l0"),
    ({**LSTM_KW, "num_layers": 1}, 2, "unexpected: weight_ih_l1"),
    ({**LSTM_KW, "num_layers": 3}, 2, "missing: weight_ih_l2"),
])
def test_state_dict_with_arch(cli, tmp_path, state_dict, arch_kwargs, code, pattern):
    out = tmp_path / "out.onnx"
    result = cli("export", state_dict, "-o", out, "--input-shape", "batch,time,6",
                 "--arch", "torch.nn:LSTM", "--arch-kwargs", json.dumps(arch_kwargs))
    if code:
        import re

        assert re.search(pattern, cli.one_error_line(result, code))
        assert not out.exists()
    else:
        assert result.exit_code == 0 and pattern in result.stdout


def test_arch_from_a_python_file(cli, tmp_path):
    source = tmp_path / "mymodel.py"
    source.write_text("from torch import nn\nclass Cell(nn.GRUCell):\n"
                      "    def __init__(self, hidden=8):\n        super().__init__(4, hidden)\n")
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(nn.GRUCell(4, 5).state_dict(), weights)
    out = tmp_path / "cell.onnx"
    result = cli("export", weights, "-o", out, "--input-shape", "batch,4",
                 "--arch", f"{source}:Cell", "--arch-kwargs", '{"hidden": 5}')
    assert result.exit_code == 0, result.output
    assert ortref.contract(out)["time_axis"] is None


@pytest.mark.parametrize("args,pattern", [
    (["--arch", "no_such_module_xyz:Model"], "could not import no_such_module_xyz"),
    (["--arch", "json:dumps"], "expected an nn.Module subclass named dumps"),
    (["--arch", "torch.nn:LTSM"], r"named LTSM in torch\.nn, found nothing; did you mean LSTM\?$"),
    (["--arch", "torch.nn:Grucell"], r"found nothing; did you mean GRUCell( or \w+)*\?$"),
    (["--arch", "torch.nn:Qzxv"], r"named Qzxv in torch\.nn, found nothing$"),
    (["--arch", "torch.nn:LSTM", "--arch-kwargs", "{not json"], "must be a JSON object"),
    (["--arch", "torch.nn:LSTM", "--arch-kwargs", '{"bogus": 1}'], "--arch-kwargs"),
    (["--arch", "LSTM"], "module:Class"),
    ([], "needs the model's class.*--arch"),
])
def test_arch_errors(cli, tmp_path, state_dict, args, pattern):
    import re

    out = tmp_path / "out.onnx"
    line = cli.one_error_line(cli("export", state_dict, "-o", out, "--input-shape", "batch,time,6", *args), 2)
    assert re.search(pattern, line), line
    assert not out.exists()


def test_missing_corrupt_and_truncated_files(cli, tmp_path, tiny_lstm_file):
    out = tmp_path / "out.onnx"
    line = cli.one_error_line(cli("export", tmp_path / "nope.pt", "-o", out, "--input-shape", "batch,time,6"), 2)
    assert "not found" in line
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a model at all" * 10)
    line = cli.one_error_line(cli("export", junk, "-o", out, "--input-shape", "batch,time,6"), 2)
    assert "not a PyTorch file" in line
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_lstm_file.read_bytes()[: tiny_lstm_file.stat().st_size // 2])
    line = cli.one_error_line(cli("export", truncated, "-o", out, "--input-shape", "batch,time,6",
                              "--trust-pickle"), 2)
    assert "not a readable PyTorch file" in line
    assert not out.exists()


@pytest.mark.slow
def test_torchscript_and_exported_program(cli, tmp_path, tiny_lstm):
    scripted = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(tiny_lstm), scripted)
    program = tmp_path / "ep.pt2"
    torch.export.save(torch.export.export(tiny_lstm, (torch.randn(2, 5, 6),)), program)
    for source in (scripted, program):
        out = tmp_path / f"{source.stem}.onnx"
        result = cli("export", source, "-o", out, "--input-shape", "batch,time,6")
        assert result.exit_code == 0, result.output
    x = torch.randn(2, 9, 6)
    with torch.no_grad():
        want = tiny_lstm(x)[0].numpy()
    for name in ("ts", "ep"):
        meta = ortref.contract(tmp_path / f"{name}.onnx")
        sess = ortref.session(tmp_path / f"{name}.onnx")
        got, _ = ortref.call(sess, meta, {"input": x.numpy()}, ortref.zero_states(meta, 2))
        assert abs(got["output"] - want).max() < 1e-5


def test_torchscript_of_a_whole_model_explains_the_way_out(cli, tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    path = tmp_path / "seq.pt"
    torch.jit.save(torch.jit.script(model), path)
    line = cli.one_error_line(cli("export", path, "-o", tmp_path / "o.onnx", "--input-shape", "batch,6"), 2)
    assert "TorchScript" in line and "--arch" in line


@pytest.mark.parametrize("shape,pattern", [
    ("batch,time,7", "expected batch,time,6"),
    ("time,batch,6", "expected batch,time,6"),
    ("batch,time,six!", "comma-separated"),
    ("batch,frames,6", "comma-separated"),
    ("time,6", "needs a 'batch' axis"),
])
def test_input_shape_errors(cli, tmp_path, tiny_lstm_file, shape, pattern):
    out = tmp_path / "out.onnx"
    line = cli.one_error_line(cli("export", tiny_lstm_file, "-o", out, "--input-shape", shape, "--trust-pickle"), 2)
    assert pattern in line
    assert not out.exists()


def test_input_shape_is_required(cli, tmp_path, tiny_lstm_file):
    line = cli.one_error_line(cli("export", tiny_lstm_file, "-o", tmp_path / "o.onnx", "--trust-pickle"), 2)
    assert "--input-shape is required" in line


def test_unwritable_output(cli, tmp_path, tiny_lstm_file):
    line = cli.one_error_line(cli("export", tiny_lstm_file, "-o", tmp_path / "no" / "dir" / "o.onnx",
                              "--input-shape", "batch,time,6", "--trust-pickle"), 2)
    assert "existing folder" in line


def test_bidirectional_stream_fails_and_sequence_works(cli, tmp_path):
    path = tmp_path / "bi.pt"
    torch.save(nn.GRU(6, 8, bidirectional=True, batch_first=True), path)
    out = tmp_path / "bi.onnx"
    line = cli.one_error_line(cli("export", path, "-o", out, "--input-shape", "batch,time,6",
                              "--trust-pickle"), 1)
    assert "bidirectional" in line and "--mode sequence" in line
    assert not out.exists()
    result = cli("export", path, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle",
                 "--mode", "sequence")
    assert result.exit_code == 0 and "sequence mode" in result.stdout


def test_failed_parity_exits_1_and_debug_shows_traceback(cli, tmp_path, tiny_lstm_file):
    out = tmp_path / "out.onnx"
    args = ["export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle",
            "--atol", "0", "--rtol", "0"]
    line = cli.one_error_line(cli(*args), 1)
    assert line.startswith("error: parity gate failed")
    assert not out.exists()
    debug = cli(*args, "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_bad_option_values_are_usage_errors(cli, tmp_path, tiny_lstm_file):
    result = cli("export", tiny_lstm_file, "-o", tmp_path / "o.onnx", "--mode", "chunky")
    assert result.exit_code == 2 and "Invalid value for '--mode'" in result.stderr
    line = cli.one_error_line(cli("export", tiny_lstm_file, "-o", tmp_path / "o.onnx", "--input-shape",
                              "batch,time,6", "--trust-pickle", "--opset", "7"), 2)
    assert "opset must be" in line


def test_inspect_table_and_json(cli, tmp_path, tiny_lstm_file):
    out = tmp_path / "out.onnx"
    assert cli("export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle").exit_code == 0
    table = cli("inspect", out)
    assert table.exit_code == 0
    for text in ("stream mode", "h0", "-> hn", "c0", "-> cn", "(2, batch, 10)", "parity: 13 cases"):
        assert text in table.stdout
    as_json = json.loads(cli("inspect", out, "--json").stdout)
    assert as_json == ortref.contract(out)


@pytest.mark.parametrize("facts,shown,hidden", [
    ({"nan_propagates": True, "referee": "float64"},
     ["NaN input: propagates", "; referee float64"], ["does not propagate"]),
    ({"nan_propagates": False, "referee": "float32"},
     ["NaN input: does not propagate (the runtime refuses NaN/inf by default)",
      "; referee float32"], ["NaN input: propagates"]),
    ({"nan_propagates": None}, [], ["NaN input", "referee"]),
], ids=["propagates", "does-not", "not-probed"])
def test_inspect_shows_the_nan_probe_and_referee(cli, tmp_path, tiny_lstm_file, facts, shown, hidden):
    import onnx

    from rnnedge.contract import METADATA_KEY

    out = tmp_path / "out.onnx"
    assert cli("export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle").exit_code == 0
    graph = onnx.load(out)
    prop = next(p for p in graph.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    meta["parity"] = {k: v for k, v in meta["parity"].items() if k != "referee"} | facts
    prop.value = json.dumps(meta)
    onnx.save(graph, out)
    table = cli("inspect", out)
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())  # rich may wrap long lines
    for fragment in shown:
        assert fragment in text, (fragment, text)
    for fragment in hidden:
        assert fragment not in text, (fragment, text)


def test_inspect_errors(cli, tmp_path):
    import onnx
    from onnx import helper

    line = cli.one_error_line(cli("inspect", tmp_path / "missing.onnx"), 2)
    assert "not found" in line
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(plain))
    line = cli.one_error_line(cli("inspect", plain), 1)
    assert "no rnnedge metadata" in line and "state_map" in line


@pytest.mark.parametrize("meta,pattern", [
    ("[1, 2]", "must be a JSON object"),
    ('{"format": 1, "mode": "stream"}', "malformed"),
    ('{"format": 3}', "format 3"),
    ("{not json", "not valid JSON"),
])
def test_inspect_refuses_malformed_metadata(cli, tmp_path, tiny_lstm_file, meta, pattern):
    import onnx

    out = tmp_path / "out.onnx"
    assert cli("export", tiny_lstm_file, "-o", out, "--input-shape", "batch,time,6", "--trust-pickle").exit_code == 0
    proto = onnx.load(str(out))
    for prop in proto.metadata_props:
        if prop.key == "rnnedge":
            prop.value = meta
    onnx.save(proto, str(out))
    assert pattern in cli.one_error_line(cli("inspect", out), 1)


def test_output_folder_and_onnx_given_as_model(cli, tmp_path, tiny_lstm_file):
    (tmp_path / "dir.onnx").mkdir()
    result = cli("export", tiny_lstm_file, "-o", tmp_path / "dir.onnx", "--input-shape", "batch,time,6",
                 "--trust-pickle")
    assert result.exit_code == 2 and "is a directory" in result.stderr  # click's own check
    graph = tmp_path / "g.onnx"
    assert cli("export", tiny_lstm_file, "-o", graph, "--input-shape", "batch,time,6", "--trust-pickle").exit_code == 0
    line = cli.one_error_line(cli("export", graph, "-o", tmp_path / "x.onnx", "--input-shape", "batch,time,6"), 2)
    assert "not a PyTorch file" in line and "ONNX graph" in line


@pytest.mark.slow
def test_installed_command_runs_in_a_subprocess(tmp_path, tiny_lstm_file):
    exe = shutil.which("rnnedge") or str(__import__("pathlib").Path(sys.executable).parent / "rnnedge")
    out = tmp_path / "sub.onnx"
    proc = subprocess.run([exe, "export", str(tiny_lstm_file), "-o", str(out), "--input-shape",
                           "batch,time,6", "--trust-pickle"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "parity" in proc.stdout
    proc = subprocess.run([exe, "export", str(tiny_lstm_file), "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
