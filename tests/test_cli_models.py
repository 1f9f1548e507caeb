"""`rnnedge export` on whole models, saved the ways users save them, through the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests import ortref, zoo

ZOO = "tests/zoo.py"


def save_checkpoint(tmp_path, model, key="model"):
    path = tmp_path / f"{type(model).__name__}.pt"
    torch.save({key: model.state_dict(), "epoch": 1}, path)
    return path


# (class, constructor kwargs, --input-shape, --input-dtype, expected time_axis)
FORMS = [
    (zoo.ElmanRNN, {"input_size": 10, "hidden_size": 12, "output_size": 5}, "batch,10", "float32", None),
    (zoo.AudioCellStep, {}, "batch,64", "float32", None),
    (zoo.CellStack, {}, "batch,6", "float32", None),
    (zoo.Tagger, {"vocab": 40}, "batch,time", "int64", 1),
    (zoo.Forecaster, {}, "time,batch,4", "float32", 0),
    (zoo.LastStepClassifier, {}, "batch,time,6", "float32", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("cls,kwargs,shape,dtype,time_axis", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_state_dict_with_arch_file_exports_and_streams(cli, tmp_path, cls, kwargs, shape, dtype, time_axis):
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    ckpt = save_checkpoint(tmp_path, model)
    out = tmp_path / "m.onnx"
    result = cli("export", ckpt, "-o", out, "--arch", f"{ZOO}:{cls.__name__}",
                 "--arch-kwargs", json.dumps(kwargs), "--input-shape", shape, "--input-dtype", dtype)
    assert result.exit_code == 0, result.output
    assert re.match(rf"wrote {re.escape(str(out))} \(.*stream mode\): parity \d+ cases passed", result.stdout)
    meta = ortref.contract(out)
    assert meta["time_axis"] == time_axis and meta["states"]
    # Drive the graph with plain onnxruntime from the contract alone, from zero states.
    sess = ortref.session(out)
    states = ortref.zero_states(meta, 2)
    spec = meta["inputs"][0]
    rng = np.random.default_rng(1)
    sizes = {"batch": 2, "time": 4}
    shape_now = [sizes.get(d, d) for d in spec["shape"]]
    x = (rng.integers(0, 40, shape_now) if dtype == "int64" else rng.standard_normal(shape_now)).astype(dtype)
    outs, new_states = ortref.call(sess, meta, {spec["name"]: x}, states)
    assert all(np.isfinite(v).all() for v in outs.values())
    assert any(np.abs(v).sum() > 0 for v in new_states.values())


@pytest.mark.slow
def test_pickled_step_module_needs_trust(cli, tmp_path):
    model = zoo.ElmanRNN()
    path = tmp_path / "elman.pt"
    torch.save(model, path)
    out = tmp_path / "e.onnx"
    line = cli.one_error_line(cli("export", path, "-o", out, "--input-shape", "batch,10"), 2)
    assert "--trust-pickle" in line
    result = cli("export", path, "-o", out, "--input-shape", "batch,10", "--trust-pickle")
    assert result.exit_code == 0, result.output
    names = [s["input"] for s in ortref.contract(out)["states"]]
    assert names == ["state"]


@pytest.mark.slow
def test_inspect_shows_lifted_state_pairs(cli, tmp_path):
    model = zoo.Tagger(vocab=40)
    ckpt = save_checkpoint(tmp_path, model, key="state_dict")
    out = tmp_path / "tagger.onnx"
    assert cli("export", ckpt, "-o", out, "--arch", f"{ZOO}:Tagger", "--arch-kwargs", '{"vocab": 40}',
               "--input-shape", "batch,time", "--input-dtype", "int64").exit_code == 0
    table = cli("inspect", out).stdout
    for text in ("int64", "(batch, time)", "-> lstm.hn", "-> lstm.cn"):
        assert text in table, table


@pytest.mark.slow
def test_sequence_mode_for_a_whole_sequence_head(cli, tmp_path):
    ckpt = save_checkpoint(tmp_path, zoo.MeanPool())
    args = ["export", ckpt, "-o", tmp_path / "mp.onnx", "--arch", f"{ZOO}:MeanPool",
            "--input-shape", "batch,time,6"]
    line = cli.one_error_line(cli(*args), 1)
    assert "cannot stream" in line and "--mode sequence" in line
    assert not (tmp_path / "mp.onnx").exists()
    result = cli(*args, "--mode", "sequence")
    assert result.exit_code == 0 and "sequence mode" in result.stdout


@pytest.mark.parametrize("cls,shape,code,pattern", [
    (zoo.NoState, "batch,6", 1, "no recurrent"),
    (zoo.HasCustomLayer, "batch,time,6", 1, "CustomLSTM"),
    (zoo.PythonLoop, "batch,time,6", 1, "loop over time"),
    (zoo.Tagger, "batch,time,3", 2, "input"),
])
def test_models_that_cannot_export_say_why(cli, tmp_path, cls, shape, code, pattern):
    ckpt = save_checkpoint(tmp_path, cls())
    out = tmp_path / "x.onnx"
    dtype = "int64" if cls is zoo.Tagger else "float32"
    line = cli.one_error_line(cli("export", ckpt, "-o", out, "--arch", f"{ZOO}:{cls.__name__}",
                                  "--input-shape", shape, "--input-dtype", dtype), code)
    assert re.search(pattern, line, re.IGNORECASE), line
    assert "Traceback" not in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [ckpt.name]
