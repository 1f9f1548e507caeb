"""Several inputs from the CLI (--input NAME=SHAPE[:DTYPE]), constants per stream
(--constant), --state-arg, and class references in --arch-kwargs ("@module:Name")."""

import json
from pathlib import Path

import numpy as np
import pytest

import rnnedge
from rnnedge.contract import ExportSpec, TensorSpec
from rnnedge.errors import ContractError

MODELS = Path(__file__).with_name("inputs_models.py")


def _saved(tmp_path, cls_name: str, **kwargs):
    """(model, state_dict file) of a seeded tests/inputs_models.py class."""
    import torch

    from rnnedge.loaders import build_arch

    torch.manual_seed(0)
    model = build_arch(f"{MODELS}:{cls_name}", kwargs).eval()
    path = tmp_path / f"{cls_name}.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.slow
def test_attention_decoder_step_streams_with_a_constant_memory(cli, tmp_path):
    import torch

    model, weights = _saved(tmp_path, "AttentionStep")
    out = tmp_path / "step.onnx"
    result = cli("export", weights, "-o", out, "--arch", f"{MODELS}:AttentionStep",
                 "--input", "memory=batch,50,16", "--input", "x=batch,8", "--constant", "memory")
    assert result.exit_code == 0, result.stderr
    m = rnnedge.load(out, device="cpu")
    assert m.input_names == ["x", "memory"]  # forward's order and names, not --input's order
    assert [t.name for t in m.contract.spec.inputs if t.constant] == ["memory"]
    for given in ([], ["--input", "x=batch,8", "--input", "memory=batch,50,16"]):  # the file's own
        verified = cli("verify", out, "--against", weights, "--arch", f"{MODELS}:AttentionStep", *given)
        assert verified.exit_code == 0, verified.stderr
    rng = np.random.default_rng(5)
    memory = rng.standard_normal((1, 50, 16)).astype(np.float32)
    stream = m.stream(batch=1, constants={"memory": memory})
    assert stream.input_names == ["x"]
    state = model.init_hidden(1)
    for _ in range(30):
        x = rng.standard_normal((1, 8)).astype(np.float32)
        with torch.no_grad():
            want, state = model(torch.from_numpy(x), torch.from_numpy(memory), state)
        np.testing.assert_allclose(stream.step(x), want.numpy(), atol=1e-5, rtol=1e-4)

    # A pool: each stream its own memory, given once at add(); stepped as one batch.
    pool = m.pool()
    memories = [rng.standard_normal((1, 50, 16)).astype(np.float32) for _ in range(3)]
    ids = [pool.add(constants={"memory": mem}) for mem in memories]
    states = [model.init_hidden(1) for _ in ids]
    for step in range(4):
        xs = {sid: rng.standard_normal((1, 8)).astype(np.float32) for sid in ids[step % 2:]}
        got = pool.step(xs)
        for k, sid in enumerate(ids):
            if sid not in xs:
                continue
            with torch.no_grad():
                want, states[k] = model(torch.from_numpy(xs[sid]), torch.from_numpy(memories[k]), states[k])
            np.testing.assert_allclose(got[sid], want.numpy(), atol=1e-5, rtol=1e-4)
    with pytest.raises(rnnedge.errors.UsageError, match="memory"):
        pool.add()  # a stream without its memory
    with pytest.raises(rnnedge.errors.UsageError, match="rows"):
        m.stream(batch=2, constants={"memory": memory})  # one row of memory for two


@pytest.mark.slow
def test_predictor_with_tokens_lengths_and_state_arg(cli, tmp_path):
    import torch

    model, weights = _saved(tmp_path, "Predictor")
    out = tmp_path / "pred.onnx"
    result = cli("export", weights, "-o", out, "--arch", f"{MODELS}:Predictor",
                 "--input", "tokens=batch,time:int64", "--input", "lengths=batch:int64",
                 "--state-arg", "state")
    assert result.exit_code == 0, result.stderr
    m = rnnedge.load(out, device="cpu")
    assert m.input_names == ["tokens", "lengths"]
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 11, size=(2, 17)).astype(np.int64)  # not the example's length
    lengths = np.array([17, 0], np.int64)
    stream = m.stream(batch=2)
    got = np.concatenate([stream.step({"tokens": tokens[:, a:a + 4], "lengths": lengths})
                          for a in range(0, 17, 4)], axis=1)
    with torch.no_grad():
        want, _ = model(torch.from_numpy(tokens), torch.from_numpy(lengths))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_arch_kwargs_class_reference_builds_and_exports(cli, tmp_path):
    import torch

    model, weights = _saved(tmp_path, "Tagger", rnn_class=torch.nn.GRU)
    out = tmp_path / "tagger.onnx"
    result = cli("export", weights, "-o", out, "--arch", f"{MODELS}:Tagger",
                 "--arch-kwargs", json.dumps({"rnn_class": "@torch.nn:GRU", "hidden": 7}),
                 "--input", "x=batch,time,5")
    assert result.exit_code == 0, result.stderr
    m = rnnedge.load(out, device="cpu")
    assert m.input_names == ["x"]
    x = np.random.default_rng(7).standard_normal((1, 9, 5)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.stream(batch=1).run(x, chunk=2), want, atol=1e-5, rtol=1e-4)


def test_arch_kwargs_references_resolve_in_lists_and_objects():
    import torch

    from rnnedge.loaders.arch import parse_kwargs

    got = parse_kwargs(json.dumps({"a": "@torch.nn:GRU", "b": ["@torch.nn:LSTM", 3],
                                   "c": {"d": f"@{MODELS}:Tagger"}, "e": "@@literal"}))
    assert got["a"] is torch.nn.GRU and got["b"][0] is torch.nn.LSTM and got["b"][1] == 3
    assert got["c"]["d"].__name__ == "Tagger" and got["e"] == "@literal"


# (extra CLI arguments, text of the one-line usage error)
USAGE_ERRORS = [
    (["--input", "y=batch,8", "--input", "memory=batch,50,16"],
     "--input y is not a parameter of AttentionStep.forward, which takes (x, memory, state)"),
    (["--input", "x=batch,8", "--input-shape", "batch,8"], "cannot be combined"),
    (["--input", "x=batch,8", "--input-dtype", "int64"], "cannot be combined"),
    (["--input", "x=batch,8", "--input", "x=batch,8"], "given twice"),
    (["--input", "x:batch,8"], "NAME=SHAPE[:DTYPE]"),
    (["--input", "x=batch,8:float16"], "dtype must be one of"),
    (["--input", "x=batch,8", "--constant", "memory"], "--constant memory names no --input"),
    (["--input", "x=batch,time,8", "--input", "memory=batch,time,16", "--constant", "memory"],
     "no time axis"),
    (["--input", "x=batch,8", "--arch-kwargs", '{"hidden": "@no_such_module_xyz:Thing"}'],
     "--arch-kwargs hidden=@no_such_module_xyz:Thing: could not import no_such_module_xyz"),
    (["--input", "x=batch,8", "--arch-kwargs", '{"hidden": "@torch.nn:NoSuchThing"}'],
     "--arch-kwargs hidden=@torch.nn:NoSuchThing: expected a class or function named NoSuchThing"),
    (["--input", "x=batch,8", "--arch-kwargs", '{"out": ["@torch.nn"]}'],
     "--arch-kwargs out[0]=@torch.nn: a reference must look like @module:Name"),
]


CASES = [("export", extra, text) for extra, text in USAGE_ERRORS] + [
    ("verify", extra, text) for extra, text in USAGE_ERRORS if "--constant" not in extra]


@pytest.mark.parametrize("command, extra, text", CASES, ids=[f"{c}-{t[:30]}" for c, _, t in CASES])
def test_input_usage_errors(cli, tmp_path, command, extra, text):
    _, weights = _saved(tmp_path, "AttentionStep")
    if command == "export":
        args = ["export", weights, "-o", tmp_path / "o.onnx"]
    else:  # refused before the graph file is read
        (tmp_path / "g.onnx").write_bytes(b"")
        args = ["verify", tmp_path / "g.onnx", "--against", weights]
    line = cli.one_error_line(cli(*args, "--arch", f"{MODELS}:AttentionStep", *extra), 2)
    assert text in line
    assert not (tmp_path / "o.onnx").exists()


def test_contract_constant_round_trips_and_is_checked():
    spec = ExportSpec("stream", (TensorSpec("x", "float32", ("batch", 8)),
                                 TensorSpec("memory", "float32", ("batch", 50, 16), constant=True)),
                      (TensorSpec("y", "float32", ("batch", 4)),), (), None, 18)
    meta = spec.metadata()
    assert "constant" not in meta["inputs"][0] and meta["inputs"][1]["constant"] is True
    assert ExportSpec.from_json(spec.to_json()).inputs[1].constant
    for bad in ("yes", 1):
        meta["inputs"][1]["constant"] = bad
        with pytest.raises(ContractError, match="'constant' must be true or false"):
            ExportSpec.from_json(json.dumps(meta))
    meta["inputs"][1].update(constant=True, shape=["batch", "time", 16])
    with pytest.raises(ContractError, match="constant but has a time axis"):
        ExportSpec.from_json(json.dumps(meta))


def test_gate_holds_constants_fixed_over_a_stream():
    from rnnedge.gate.cases import hold_constants

    spec = ExportSpec("stream", (TensorSpec("x", "float32", ("batch", 2)),
                                 TensorSpec("memory", "float32", ("batch", 3), constant=True)),
                      (TensorSpec("y", "float32", ("batch", 2)),), (), None, 18)
    rng = np.random.default_rng(0)
    steps = [{"x": rng.standard_normal((1, 2)), "memory": rng.standard_normal((1, 3))} for _ in range(3)]
    held = hold_constants(spec, steps)
    assert all(h["memory"] is steps[0]["memory"] for h in held)
    assert [h["x"] is s["x"] for h, s in zip(held, steps)] == [True] * 3
