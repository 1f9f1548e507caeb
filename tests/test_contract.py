"""The graph contract (rnnedge.contract): one writer, one validated reader for every consumer."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import pytest

import rnnedge
from rnnedge.contract import ExportSpec, StateSpec, TensorSpec, from_json
from rnnedge.errors import ContractError
from rnnedge.graphs.metadata import read_metadata, write_metadata
from tests import runtime_graphs as G

SPEC = ExportSpec(
    "stream",
    (TensorSpec("input.0", "float32", ("batch", "time", 3)),
     TensorSpec("input.1", "int64", ("batch", "time"), (0, 40))),
    (TensorSpec("output", "float32", ("batch", "time", 5)),),
    (StateSpec("h0", "hn", "float32", (2, "batch", 5), 1),
     StateSpec("c0", "cn", "float32", (2, "batch", 5), 1)),
    1, 18, {"class": "m.Net", "torch": "2.13.0"}, {"max_abs": 1e-7, "cases": 3},
)


def test_round_trip():
    text = SPEC.to_json()
    assert from_json(text) == SPEC
    meta = json.loads(text)
    assert meta["format"] == 1 and meta["inputs"][1]["range"] == [0, 40]
    assert "range" not in meta["inputs"][0]  # written only when known
    assert json.loads(SPEC.metadata_json({"cases": 9}))["parity"] == {"cases": 9}


@pytest.mark.parametrize("ratio,written", [(2, 2), ((1, 4), [1, 4]), ((3, 2), [3, 2])])
def test_time_ratio_round_trips(ratio, written):
    spec = SPEC.replace(outputs=(TensorSpec("output", "float32", ("batch", "time", 5),
                                            time_ratio=ratio),))
    meta = json.loads(spec.to_json())
    assert meta["outputs"][0]["time_ratio"] == written
    assert from_json(spec.to_json()).outputs[0].time_ratio == ratio


@pytest.mark.parametrize("end, written", [(None, None), (-4, -4), (0, 0), ((1, 2), [1, 2]),
                                          ((-3, 4), [-3, 4])])
def test_end_offset_round_trips(end, written):
    """An output's end (floor(N * time_ratio + end_offset) frames): written only when set."""
    spec = SPEC.replace(outputs=(TensorSpec("output", "float32", ("batch", "time", 5),
                                            time_ratio=(1, 2), end_offset=end),))
    meta = json.loads(spec.to_json())
    assert meta["outputs"][0].get("end_offset") == written
    assert ("end_offset" in meta["outputs"][0]) == (end is not None)
    assert from_json(spec.to_json()).outputs[0].end_offset == end


@pytest.mark.parametrize("end", [None, (10, 74), (0, 1)])
def test_model_end_round_trips(end):
    """Where a model pads its whole input to itself, off the stream's grid: [residue, least]."""
    spec = SPEC.replace(chunk_multiple=32, latency=154, chunk_offset=2, model_end=end)
    meta = json.loads(spec.to_json())
    assert meta.get("model_end") == (None if end is None else list(end))
    assert from_json(spec.to_json()).model_end == end


@pytest.mark.parametrize("multiple, latency, offset, fmt", [
    (1, 0, 0, 1), (4, 0, 0, 2), (1, 3, 0, 2), (4, 2, 0, 2), (4, 5, 1, 2), (64, 84, 20, 2),
    (4, 0, 3, 2),
])
def test_chunk_multiple_latency_and_offset_round_trip(multiple, latency, offset, fmt):
    """Strided and late at once is a contract; the offset is written only when not 0."""
    spec = SPEC.replace(chunk_multiple=multiple, latency=latency, chunk_offset=offset)
    meta = json.loads(spec.to_json())
    assert meta["format"] == fmt
    assert ("chunk_offset" in meta) == (offset != 0)
    assert meta.get("chunk_offset", 0) == offset
    back = from_json(spec.to_json())
    assert back == spec and (back.chunk_multiple, back.latency, back.chunk_offset) == (
        multiple, latency, offset)


def test_older_metadata_without_optional_entries_reads():
    meta = SPEC.metadata()
    for key in ("time_axis", "source", "parity"):
        meta.pop(key)
    meta["states"][0].pop("init")
    spec = from_json(json.dumps(meta))
    assert spec.time_axis is None and spec.source == {} and spec.parity == {}
    assert spec.states[0].init == "zeros"


def test_state_shape_and_zeros():
    s = SPEC.states[0]
    assert s.shape_for(3) == (2, 3, 5)
    z = s.zeros(4)
    assert z.shape == (2, 4, 5) and z.dtype == np.float32 and not z.any()
    assert list(SPEC.zero_states(1)) == ["h0", "c0"]


def test_readers_helpers():
    seq = SPEC.replace(mode="sequence", inputs=SPEC.inputs + (TensorSpec("lengths", "int64", ("batch",)),))
    assert seq.has_lengths and not SPEC.has_lengths
    assert [t.name for t in seq.data_inputs] == ["input.0", "input.1"]
    assert [seq.time_axis_of(t) for t in seq.inputs] == [1, 1, None]
    assert SPEC.inputs[0].batch_axis == 0


def _set(path, value):
    def change(meta):
        *keys, last = path
        target = meta
        for k in keys:
            target = target[k]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return change


_DROP = object()


@pytest.mark.parametrize("change,message", [
    (_set(["format"], 3), "has format 3; this version reads formats 1 and 2"),
    (_set(["format"], True), "format True"),
    (_set(["inputs"], _DROP), "lacks 'inputs'"),
    (_set(["opset"], _DROP), "lacks 'opset'"),
    (_set(["mode"], "batch"), "mode must be one of"),
    (_set(["time_axis"], -1), "time_axis must be null or an int"),
    (_set(["time_axis"], "1"), "time_axis must be null or an int"),
    (_set(["opset"], "18"), "opset must be an int"),
    (_set(["states"], {}), "'states' must be a list"),
    (_set(["inputs", 0], "input"), "input must be a JSON object"),
    (_set(["inputs", 0, "name"], ""), "non-empty string 'name'"),
    (_set(["inputs", 0, "dtype"], "float"), "dtype 'float'; known dtypes"),
    (_set(["inputs", 0, "shape"], "xyz"), "needs a 'shape' list"),
    (_set(["inputs", 0, "shape", 2], -3), "shape entries must be"),
    (_set(["inputs", 0, "shape", 2], 2.5), "shape entries must be"),
    (_set(["inputs", 0, "range"], [0, 4]), "only integer inputs have"),
    (_set(["inputs", 1, "range"], [5, 5]), "low < high"),
    (_set(["inputs", 1, "range"], [0, 1.5]), "low < high"),
    (_set(["inputs", 1, "name"], "input.0"), "'input.0' is listed twice"),
    (_set(["states", 1, "output"], "hn"), "'hn' is listed twice"),
    (_set(["states", 0, "batch_axis"], 0), "batch_axis 0 is not a dynamic axis"),
    (_set(["states", 0, "batch_axis"], 3), "batch_axis 3 is not a dynamic axis"),
    (_set(["states", 0, "batch_axis"], None), "batch_axis None is not a dynamic axis"),
    (_set(["states", 0, "shape", 0], "layers"), "only the batch axis may be dynamic"),
    (_set(["states", 0, "init"], "random"), "unknown init 'random'"),
    (_set(["states", 0, "dtype"], "complex64"), "dtype 'complex64'"),
    (_set(["parity"], [1]), "'parity' must be an object"),
    (_set(["outputs", 0, "end_offset"], 1.5), "end_offset must be an int or a reduced fraction"),
    (_set(["outputs", 0, "end_offset"], [2, 4]), "end_offset must be an int or a reduced fraction"),
    (_set(["outputs", 0, "end_offset"], [1, 1]), "end_offset must be an int or a reduced fraction"),
    (_set(["outputs", 0, "end_offset"], True), "end_offset must be an int or a reduced fraction"),
    (lambda meta: meta.update(chunk_multiple=4, model_end=[4, 10], format=2),
     "'model_end' must be [residue, least] with 0 <= residue < 'chunk_multiple' 4"),
    (lambda meta: meta.update(chunk_multiple=4, model_end=[1, 0], format=2),
     "'model_end' must be [residue, least]"),
    (lambda meta: meta.update(chunk_multiple=4, model_end=[1], format=2),
     "'model_end' must be [residue, least]"),
    (lambda meta: meta.update(chunk_multiple=4, chunk_offset=4, format=2),
     "'chunk_offset' must be below 'chunk_multiple' 4, got 4"),
    (lambda meta: meta.update(chunk_offset=1, format=2),
     "'chunk_offset' must be below 'chunk_multiple' 1, got 1"),
    (lambda meta: meta.update(chunk_multiple=4, chunk_offset=-1, format=2),
     "'chunk_offset' must be an int >= 0, got -1"),
    (lambda meta: meta.update(chunk_multiple=4, chunk_offset=1.0, format=2),
     "'chunk_offset' must be an int >= 0, got 1.0"),
    (lambda meta: meta.update(chunk_multiple=4, chunk_offset=True, format=2),
     "'chunk_offset' must be an int >= 0, got True"),
    (lambda meta: meta.update(chunk_multiple=4, chunk_offset="2", format=2),
     "'chunk_offset' must be an int >= 0, got '2'"),
    (_set(["outputs", 0, "time_ratio"], 0), "time_ratio must be an int >= 1 or a reduced fraction"),
    (_set(["outputs", 0, "time_ratio"], [2, 4]), "time_ratio must be an int >= 1 or a reduced fraction"),
    (_set(["outputs", 0, "time_ratio"], [1, 1]), "time_ratio must be an int >= 1 or a reduced fraction"),
    (_set(["outputs", 0, "time_ratio"], 0.25), "time_ratio must be an int >= 1 or a reduced fraction"),
])
def test_validation_errors(change, message):
    meta = copy.deepcopy(SPEC.metadata())
    change(meta)
    with pytest.raises(ContractError, match=re.escape(message)) as err:
        from_json(json.dumps(meta))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ("{}", "format None"),
])
def test_text_that_is_no_contract(text, message):
    with pytest.raises(ContractError, match=re.escape(message)):
        from_json(text)


# --- the contract against the graph it describes -------------------------------------------


def tampered(change, graph: bytes | None = None) -> onnx.ModelProto:
    model = onnx.load_from_string(graph or G.rnn("GRU", hidden=8))
    meta = json.loads(read_metadata(model))
    change(meta)
    write_metadata(model, json.dumps(meta))
    return model


@pytest.mark.parametrize("change,message", [
    (_set(["states", 0, "shape", 2], 9), "gives input 'h0' shape [1, 'batch', 9], the graph float32[1, batch, 8]"),
    (_set(["outputs", 0, "shape", 2], 7), "gives output 'output' shape ['time', 'batch', 7]"),
    (_set(["inputs", 0, "shape", 2], 4), "gives input 'input' shape ['time', 'batch', 4]"),
    (_set(["outputs", 0, "shape"], ["time", "batch"]), "gives output 'output' rank 2, the graph rank 3"),
    (_set(["inputs", 0, "shape"], "xyz"), "needs a 'shape' list"),
    (_set(["states", 0, "dtype"], "float64"), "says input 'h0' is float64, the graph says float32"),
])
def test_tampered_metadata_is_refused_at_load(change, message):
    data = tampered(change).SerializeToString()
    with pytest.raises(ContractError, match=re.escape(message)):
        rnnedge.load(data, device="cpu")


def test_metadata_helpers_keep_other_entries():
    model = onnx.load_from_string(G.rnn("GRU"))
    onnx.helper.set_model_props(model, {"other": "x", "rnnedge": read_metadata(model)})
    write_metadata(model, "{}")
    assert {p.key: p.value for p in model.metadata_props} == {"other": "x", "rnnedge": "{}"}
    del model.metadata_props[:]
    assert read_metadata(model) is None


# --- inspect reads what load reads -----------------------------------------------------------


@pytest.mark.parametrize("change,shown", [
    (lambda m: m["states"][0].pop("init"), "init zeros"),
    (lambda m: m.update(source="exported by hand"), "source: exported by hand"),
    (lambda m: m.update(source=None, parity={}), "-> hn"),
])
def test_inspect_takes_what_load_takes(cli, tmp_path, change, shown):
    path = tmp_path / "g.onnx"
    onnx.save(tampered(change), str(path))
    assert rnnedge.load(path, device="cpu").state_names == ["h0"]
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert shown in result.stdout
    as_json = json.loads(cli("inspect", path, "--json").stdout)
    assert as_json["states"][0]["init"] == "zeros"


def test_inspect_refuses_what_load_refuses(cli, tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(tampered(_set(["states", 0, "shape", 2], 9)), str(path))
    line = cli.one_error_line(cli("inspect", path), 1)
    assert "shape [1, 'batch', 9]" in line and str(path) in line


# --- token ranges: written by the exporter, used by bench ------------------------------------


@pytest.fixture(scope="module")
def tagger_file(tmp_path_factory):
    import torch

    from tests.zoo import Tagger

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tagger") / "tagger.onnx"
    rnnedge.export(Tagger(vocab=40), path, example_input=torch.randint(0, 40, (2, 5)))
    return path


def test_token_range_is_recorded_for_an_embedding_input(tagger_file):
    spec = from_json(read_metadata(onnx.load(str(tagger_file))))
    assert spec.inputs[0].dtype == "int64" and spec.inputs[0].range == (0, 40)


@pytest.mark.parametrize("range_,high", [([0, 3], 3), (None, 40)])
def test_bench_samples_tokens_in_the_contract_range(tagger_file, tmp_path, range_, high):
    from rnnedge.bench.inputs import make_inputs
    from rnnedge.exporters.verify import read_graph

    def change(meta):
        if range_ is None:  # a file written before ranges were recorded: the Gather scan
            meta["inputs"][0].pop("range")
        else:
            meta["inputs"][0]["range"] = range_

    path = tmp_path / "t.onnx"
    onnx.save(tampered(change, tagger_file.read_bytes()), str(path))
    feeds = make_inputs(read_graph(path), batch=4, chunk=50, count=2)
    ids = np.concatenate([f["input"].ravel() for f in feeds])
    assert ids.min() >= 0 and ids.max() == high - 1
