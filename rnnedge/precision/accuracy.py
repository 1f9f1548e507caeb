"""Task-level check: how much a reduced-precision graph changes what the model does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from rnnedge.contract import ExportSpec, from_json
from rnnedge.errors import UsageError
from rnnedge.graphs.metadata import read_metadata


@dataclass
class Agreement:
    """A reduced-precision graph against its float32 graph on the same inputs.

    reference/candidate: each data output by name, from the float32 / other graph.
    max_abs, rmse: per output. top1: per output, the fraction of positions (every index
    but the last axis) whose argmax over the last axis is the same in both — a
    classifier's agreement.
    """

    reference: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)
    max_abs: dict = field(default_factory=dict)
    rmse: dict = field(default_factory=dict)
    top1: dict = field(default_factory=dict)


def _contract(model: onnx.ModelProto) -> ExportSpec:
    text = read_metadata(model)
    if text is None:
        raise UsageError("the graph has no rnnedge metadata: pass graphs written by rnnedge.export")
    return from_json(text)


def run_graph(path, inputs, threads: int = 1) -> dict:
    """Data outputs of the rnnedge graph at ``path`` for ``inputs``, from zero states.

    inputs: {name: array} for the graph's data inputs, or one array when it has one, e.g.
    (batch, time, features) for a batch-first layer; the whole sequence in one call.
    """
    import onnxruntime as ort

    model = onnx.load(os.fspath(path))
    spec = _contract(model)
    if not isinstance(inputs, dict):
        if len(spec.inputs) != 1:
            names = ", ".join(t.name for t in spec.inputs)
            raise UsageError(f"the graph takes several inputs ({names}); pass a dict")
        inputs = {spec.inputs[0].name: inputs}
    first = np.asarray(next(iter(inputs.values())))
    batch = first.shape[spec.inputs[0].batch_axis]
    feeds = {k: np.asarray(v) for k, v in inputs.items()} | spec.zero_states(batch)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]
    return dict(zip(names, sess.run(names, feeds)))


def agreement(fp32_path, other_path, inputs) -> Agreement:
    """Run the float32 graph and a reduced-precision graph of the same model on ``inputs``.

    inputs: as for ``run_graph``. Returns an ``Agreement`` (both graphs' outputs, their
    max abs difference and RMSE, and top-1 agreement over the last axis).
    """
    ref = run_graph(fp32_path, inputs)
    got = run_graph(other_path, inputs)
    result = Agreement(reference=ref, candidate=got)
    for name, want in ref.items():
        have = got[name]
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
        result.max_abs[name] = float(diff.max()) if diff.size else 0.0
        result.rmse[name] = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
        if want.ndim and want.shape[-1] > 1:
            result.top1[name] = float(np.mean(want.argmax(-1) == have.argmax(-1)))
    return result
