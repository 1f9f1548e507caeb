"""Triton model repositories: config parsed with Triton's own schema, checked against the graph,
and the graph driven the way Triton's sequence batcher drives it."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

import rnnedge
from rnnedge import triton
from rnnedge.errors import UsageError
from tests import ortref

torch.set_num_threads(1)

DTYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}
MODELS = {
    "lstm-bf": lambda: nn.LSTM(6, 10, num_layers=2, batch_first=True),
    "gru-tm": lambda: nn.GRU(6, 10, num_layers=2),
    "rnn-tm": lambda: nn.RNN(6, 10),
    "lstm-proj": lambda: nn.LSTM(6, 10, proj_size=4),
    "lstmcell": lambda: nn.LSTMCell(6, 10),
    "grucell": lambda: nn.GRUCell(6, 10),
}
CASES = [("lstm-bf", "fp32"), ("gru-tm", "fp32"), ("rnn-tm", "int8"), ("gru-tm", "int8"),
         ("lstm-bf", "fp16"), ("lstm-proj", "fp32"), ("lstmcell", "fp32"), ("grucell", "int8")]


def make(kind):
    torch.manual_seed(5)
    return MODELS[kind]().eval()


def example(model):
    return torch.randn(1, 6) if isinstance(model, nn.RNNCellBase) else torch.randn(1, 1, 6)


def parse_config(folder) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def graph_dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in vi.type.tensor_type.shape.dim]


def triton_dims(vi) -> list:
    """What Triton's dims must be for a graph tensor: batch dropped, symbolic axes -1."""
    dims = graph_dims(vi)
    assert dims[0] == "batch", f"{vi.name} is not batch-first: {dims}"
    return [d if isinstance(d, int) else -1 for d in dims[1:]]


@pytest.mark.parametrize("kind,precision", CASES)
def test_repository_matches_graph(tmp_path, kind, precision):
    model = make(kind)
    out = tmp_path / "plain.onnx"
    report = rnnedge.export(model, out, example_input=example(model), precision=precision,
                            triton_repo=tmp_path / "repo", triton_name="rnn_model-1")
    folder = tmp_path / "repo" / "rnn_model-1"
    assert report.triton == folder and out.exists()
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt"]
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]

    config = parse_config(folder)
    graph = onnx.load(folder / "1" / "model.onnx")
    g_in = {v.name: v for v in graph.graph.input}
    g_out = {v.name: v for v in graph.graph.output}
    assert config.name == "rnn_model-1" and config.backend == "onnxruntime"
    assert config.max_batch_size > 0
    seq = config.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest" and not seq.control_input
    # The onnxruntime backend requires: model inputs == config inputs + states.
    assert len(g_in) == len(config.input) + len(seq.state)
    for t in config.input:
        assert list(t.dims) == triton_dims(g_in[t.name])
        assert t.data_type == DTYPES[g_in[t.name].type.tensor_type.elem_type]
    for t in config.output:
        assert list(t.dims) == triton_dims(g_out[t.name])
    meta = ortref.contract(folder / "1" / "model.onnx")
    assert [(s.input_name, s.output_name) for s in seq.state] == [
        (s["input"], s["output"]) for s in meta["states"]]
    for s in seq.state:
        dims = triton_dims(g_in[s.input_name])
        assert list(s.dims) == dims == triton_dims(g_out[s.output_name])
        assert s.data_type == mc.TYPE_FP32
        (init,) = s.initial_state
        assert init.zero_data and list(init.dims) == dims and init.data_type == s.data_type
    assert all(s["batch_axis"] == 0 for s in meta["states"])
    kinds = [g.kind for g in config.instance_group]
    assert kinds == ([mc.ModelInstanceGroup.KIND_CPU] if precision == "int8" else [])
    # The variant has its own gate run, and it says so.
    assert report.triton_cases and all(r.passed for r in report.triton_cases)
    assert meta["parity"]["cases"] == len(report.triton_cases)


def eager_sequence(model, x, batch_first):
    """One sequence alone through eager PyTorch from zeros: x (T, F) -> (T, H)."""
    with torch.no_grad():
        if isinstance(model, nn.RNNCellBase):
            state = None
            outs = []
            for step in torch.from_numpy(x):
                state = model(step[None], state)
                outs.append((state[0] if isinstance(state, tuple) else state)[0])
            return torch.stack(outs).numpy()
        xt = torch.from_numpy(x)[None] if batch_first else torch.from_numpy(x)[:, None]
        y, _ = model(xt)
        return (y[0] if batch_first else y[:, 0]).numpy()


@pytest.mark.parametrize("kind,precision", [("gru-tm", "fp32"), ("lstm-bf", "fp32"),
                                            ("lstmcell", "fp32"), ("gru-tm", "int8")])
def test_driven_like_the_sequence_batcher(tmp_path, kind, precision):
    """Streams of different lengths batched along axis 0 in changing company, each
    stream's state kept apart between calls (implicit state), zeros at its start."""
    model = make(kind)
    rnnedge.export(model, tmp_path / "m.onnx", example_input=example(model), precision=precision,
                   triton_repo=tmp_path / "repo")
    path = tmp_path / "repo" / "m" / "1" / "model.onnx"
    meta, sess = ortref.contract(path), ortref.session(path)
    step_graph = meta["time_axis"] is None
    rng = np.random.default_rng(9)
    streams = {sid: rng.standard_normal((n, 6)).astype(np.float32)
               for sid, n in ((1, 9), (2, 5), (3, 12))}
    pos = {sid: 0 for sid in streams}
    state = {}  # Triton's per-sequence implicit state
    got = {sid: [] for sid in streams}
    chunk = 1 if step_graph else 2
    rounds = 0
    while any(pos[s] < len(x) for s, x in streams.items()):
        ready = [s for s, x in streams.items() if pos[s] < len(x)]
        rng.shuffle(ready)  # the oldest strategy forms batches in any order
        ready = ready[: 1 + rounds % len(ready)]  # and of any size
        rounds += 1
        size = min(chunk, *(len(streams[s]) - pos[s] for s in ready))
        xs = [streams[s][pos[s]:pos[s] + size] for s in ready]
        feed = np.stack([x[0] for x in xs]) if step_graph else np.stack(xs)
        zeros = ortref.zero_states(meta, 1)
        states = {k: np.concatenate([state.get(s, zeros)[k] for s in ready], axis=0)
                  for k in zeros}
        outs, new = ortref.call(sess, meta, {"input": feed}, states)
        for row, s in enumerate(ready):
            state[s] = {k: v[row:row + 1] for k, v in new.items()}
            y = outs["output"][row]
            got[s].append(y[None] if step_graph else y)
            pos[s] += size
    tol = 1e-4 if precision == "fp32" else 0.05
    batch_first = getattr(model, "batch_first", True)
    for s, x in streams.items():
        np.testing.assert_allclose(np.concatenate(got[s]), eager_sequence(model, x, batch_first),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["a/b", ".hidden", "", "x y", "m.v2", "naïve", "a\\b", None])
def test_bad_model_name_writes_nothing(tmp_path, name):
    model = make("gru-tm")
    out = tmp_path / "m.onnx"
    with pytest.raises(UsageError, match="Triton model name"):
        rnnedge.export(model, out, example_input=example(model), triton_repo=tmp_path / "repo",
                       triton_name=name if name is not None else 5)
    assert not out.exists() and not (tmp_path / "repo").exists()


def test_default_name_is_the_file_stem_and_is_checked(tmp_path):
    model = make("rnn-tm")
    report = rnnedge.export(model, tmp_path / "speech_rnn.onnx", example_input=example(model),
                            triton_repo=tmp_path / "repo")
    assert report.triton == tmp_path / "repo" / "speech_rnn"
    with pytest.raises(UsageError, match="--triton-name speech_rnn_int8"):
        rnnedge.export(model, tmp_path / "speech_rnn.int8.onnx", example_input=example(model),
                       triton_repo=tmp_path / "repo")


@pytest.mark.parametrize("kwargs,pattern", [
    ({"mode": "sequence"}, "needs mode='stream'"),
    ({"triton_repo": None, "triton_name": "m"}, "triton_name needs triton_repo"),
])
def test_unsupported_combinations(tmp_path, kwargs, pattern):
    model = make("gru-tm")
    args = {"triton_repo": tmp_path / "repo", **kwargs}
    with pytest.raises(UsageError, match=pattern):
        rnnedge.export(model, tmp_path / "m.onnx", example_input=example(model), **args)
    assert not any(tmp_path.iterdir())


def test_repository_folder_that_is_a_file(tmp_path):
    (tmp_path / "repo").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        rnnedge.export(make("gru-tm"), tmp_path / "m.onnx", example_input=torch.randn(1, 1, 6),
                       triton_repo=tmp_path / "repo")
    assert not (tmp_path / "m.onnx").exists()


def test_existing_model_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    model = make("gru-tm")
    repo = tmp_path / "repo"
    (repo / "m" / "2").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text("old")
    (repo / "m" / "2" / "model.onnx").write_bytes(b"old")

    real = type(repo).write_text

    def failing(self, *args, **kwargs):
        if self.name == "config.pbtxt":
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(repo), "write_text", failing)
    with pytest.raises(UsageError, match="No space left on device"):  # one line, exit 2
        rnnedge.export(model, tmp_path / "m.onnx", example_input=example(model), triton_repo=repo)
    monkeypatch.undo()
    # The old model untouched, no temporary folder left, the graph file not written either.
    assert (repo / "m" / "config.pbtxt").read_text() == "old"
    assert sorted(os.listdir(repo)) == ["m"] and not (tmp_path / "m.onnx").exists()

    rnnedge.export(model, tmp_path / "m.onnx", example_input=example(model), triton_repo=repo)
    assert sorted(os.listdir(repo)) == ["m"]
    assert sorted(os.listdir(repo / "m")) == ["1", "config.pbtxt"]  # version 2 went with it
    assert parse_config(repo / "m").name == "m"


def test_repository_rolls_back_when_the_graph_file_cannot_be_written(tmp_path):
    model = make("gru-tm")
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text("old")
    # A legal file name of 255 characters: its temporary sibling's longer name cannot be
    # created, so the graph write fails after the repository is staged.
    graph = tmp_path / ("g" * 250 + ".onnx")
    with pytest.raises(UsageError, match="cannot write"):
        rnnedge.export(model, graph, example_input=example(model), triton_repo=repo,
                       triton_name="m")
    # Both or neither: the previous model is back, whole, and no temporary folder is left.
    assert (repo / "m" / "config.pbtxt").read_text() == "old"
    assert sorted(os.listdir(repo)) == ["m"] and sorted(os.listdir(tmp_path)) == ["repo"]


def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "gru").mkdir()
    model = make("gru-tm")
    with pytest.raises(UsageError, match="it is a folder"):
        rnnedge.export(model, tmp_path / "gru", example_input=example(model),
                       triton_repo=tmp_path / "repo")
    assert sorted(os.listdir(tmp_path)) == ["gru"]


def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        model = make("gru-tm")
        out = tmp_path / "m.onnx"
        rnnedge.export(model, out, example_input=example(model), triton_repo=tmp_path / "repo")
        assert out.stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "repo" / "m").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "repo" / "m" / "1" / "model.onnx").stat().st_mode & 0o777 == 0o644
        out.chmod(0o640)  # an existing file keeps its mode when replaced
        rnnedge.export(model, out, example_input=example(model))
        assert out.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_cli_writes_repository(cli, tmp_path):
    torch.manual_seed(0)
    torch.save(nn.LSTM(6, 10, num_layers=2, batch_first=True), tmp_path / "m.pt")
    out = tmp_path / "lstm.onnx"
    result = cli("export", str(tmp_path / "m.pt"), "-o", str(out),
                 "--input-shape", "batch,time,6", "--trust-pickle",
                 "--triton-repo", str(tmp_path / "repo"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (") and "parity 13 cases passed" in lines[0]
    assert lines[1].startswith("wrote Triton model 'lstm' to ") and "13 cases passed" in lines[1]
    assert f"tritonserver --model-repository {tmp_path / 'repo'}" in lines[1]
    assert parse_config(tmp_path / "repo" / "lstm").name == "lstm"


def test_cli_bad_name_is_one_line_exit_2(cli, tmp_path):
    torch.save(nn.GRU(6, 10), tmp_path / "m.pt")
    result = cli("export", str(tmp_path / "m.pt"), "-o",
                 str(tmp_path / "g.onnx"), "--input-shape", "time,batch,6",
                 "--trust-pickle", "--triton-repo", str(tmp_path / "repo"),
                 "--triton-name", "../escape")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Triton model name '../escape'")
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_config_text_refuses_what_triton_cannot_batch():
    from rnnedge.contract import ExportSpec, StateSpec, TensorSpec
    from rnnedge.errors import UnsupportedModelError

    spec = ExportSpec("stream", (TensorSpec("input", "float32", ("time", "batch", 6)),),
                      (TensorSpec("output", "float32", ("time", "batch", 4)),),
                      (StateSpec("h0", "hn", "float32", (1, "batch", 4), 1),), 0, 18)
    with pytest.raises(UnsupportedModelError, match="not batch-first"):
        triton.config_text(spec, "m")
    fixed = triton.batch_first_spec(spec)
    assert fixed.time_axis == 1 and fixed.states[0].shape == ("batch", 1, 4)
    text = triton.config_text(fixed, "m")
    assert text_format.Parse(text, mc.ModelConfig()).sequence_batching.state[0].dims == [1, 4]


@pytest.mark.parametrize("out", ["repo", "repo/m/1/model.onnx"])
def test_graph_file_inside_the_repository_is_refused(tmp_path, out):
    model = make("gru-tm")
    with pytest.raises(UsageError, match="would land in or on the Triton repository"):
        rnnedge.export(model, tmp_path / out if out != "repo" else tmp_path / "repo",
                       example_input=example(model), triton_repo=tmp_path / "repo",
                       triton_name="m")
    assert not (tmp_path / "repo").exists()
