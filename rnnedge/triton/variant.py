"""The batch-first variant of an rnnedge graph, for Triton Inference Server.

Triton batches along the first axis of every input, output and state. rnnedge's stack
graphs keep PyTorch's layouts — state (layers*dirs, batch, hidden), and time-major data
(time, batch, features) for layers built without batch_first — so for Triton the proven
graph is wrapped with Transposes (``rnnedge.graphs.batch_first``) into a batch-first
variant, which gets its own contract (states with ``batch_axis`` 0) and its own run of the
parity gate (``batch_first_plan``).
"""

from __future__ import annotations

import numpy as np
import onnx

from rnnedge.errors import UnsupportedModelError
from rnnedge.graphs.batch_first import batch_first, inverse
from rnnedge.triton.config import config_text


def _to_front(rank: int, axis: int) -> list[int]:
    """The permutation that moves ``axis`` to position 0, others in order."""
    return [axis] + [i for i in range(rank) if i != axis]


def moves(spec) -> dict[str, list[int]]:
    """{graph name: perm to batch-first} for each data tensor/state not batch-first yet."""
    found = {}
    for t in (*spec.inputs, *spec.outputs):
        if "batch" in t.shape and t.shape.index("batch") != 0:
            found[t.name] = _to_front(len(t.shape), t.shape.index("batch"))
    for s in spec.states:
        if s.batch_axis != 0:
            perm = _to_front(len(s.shape), s.batch_axis)
            found[s.input] = found[s.output] = perm
    return found


def batch_first_graph(model: onnx.ModelProto, spec) -> onnx.ModelProto:
    """``model`` with every data input/output and state of ``spec`` moved to batch-first.

    Names, dtypes and everything inside stay; see ``rnnedge.graphs.batch_first``.
    """
    return batch_first(model, moves(spec))


def batch_first_spec(spec):
    """The contract of ``batch_first_graph``: shapes permuted, states with batch_axis 0."""
    from rnnedge.contract import StateSpec, TensorSpec

    perms = moves(spec)

    def tensor(t):
        if t.name not in perms:
            return t
        return TensorSpec(t.name, t.dtype, tuple(t.shape[p] for p in perms[t.name]))

    inputs = tuple(tensor(t) for t in spec.inputs)
    outputs = tuple(tensor(t) for t in spec.outputs)
    states = tuple(
        StateSpec(s.input, s.output, s.dtype, tuple(s.shape[p] for p in perms[s.input]), 0, s.init)
        if s.input in perms else s
        for s in spec.states
    )
    time_axis = spec.time_axis
    if time_axis is not None:
        timed = {t.shape.index("time") for t in inputs if "time" in t.shape}
        if len(timed) > 1:
            raise UnsupportedModelError(
                "the graph's data inputs put time on different axes once batch-first; "
                "Triton serving needs one time axis"
            )
        time_axis = timed.pop() if timed else time_axis
    return spec.replace(inputs=inputs, outputs=outputs, states=states, time_axis=time_axis)


def batch_first_plan(plan, model: onnx.ModelProto):
    """(plan, graph) for the batch-first variant of ``model`` (the graph ``plan`` proves).

    The returned plan's spec is ``batch_first_spec``; its reference and sample are the
    original's with inputs, outputs and states transposed, so the same eager model checks
    the variant through the same gate.
    """
    from rnnedge.gate.plan import Plan

    spec = plan.spec
    perms = moves(spec)
    new_spec = batch_first_spec(spec)
    graph = batch_first_graph(model, spec)

    def move(arrays: dict, forward: bool) -> dict:
        out = {}
        for k, v in arrays.items():
            perm = perms.get(k)
            out[k] = v if perm is None else np.ascontiguousarray(
                np.transpose(v, perm if forward else inverse(perm)))
        return out

    def reference(inputs: dict, states: dict):
        outs, new_states = plan.reference(move(inputs, False), move(states, False))
        return move(outs, True), move(new_states, True)

    def sample(rng, batch, time):
        return move(plan.sample(rng, batch, time), True)

    return Plan(new_spec, graph, reference, sample, plan.lengths_input, plan.model), graph


def prepare_variant(plan, model: onnx.ModelProto, name: str, *, precision: str, prove):
    """(model bytes, config.pbtxt text, gate results) of the Triton model ``name``: the
    batch-first variant of ``model`` (the graph ``plan`` proves), proven, and its config.

    prove: ``(variant plan, variant graph) -> (serialized graph with its metadata, gate
    results)``, the exporter's gate run on the variant; it raises ParityError on a miss.
    """
    variant_plan, variant = batch_first_plan(plan, model)
    data, cases = prove(variant_plan, variant)
    return data, config_text(variant_plan.spec, name, precision=precision), cases
