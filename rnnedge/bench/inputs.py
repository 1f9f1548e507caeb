"""Seeded inputs for the engines: the same pre-made feeds for every engine of a measurement."""

from __future__ import annotations

import numpy as np

from rnnedge.contract import TensorSpec
from rnnedge.errors import UsageError

SEED = 20261127


def _vocab_of(model, name: str) -> int:
    """Rows of the embedding table an int64 input indexes (1 when it cannot be told), found
    by scanning the graph's Gather nodes: only for graphs whose contract has no ``range``."""
    inits = {i.name: i for i in model.graph.initializer}
    sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
             if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) >= 1
             and (n.input[1] == name)]
    if not sizes:  # indices may pass through a Cast or Reshape first: any embedding table
        sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
                 if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return int(min(sizes)) if sizes else 1


def _input_shape(t: TensorSpec, batch: int, chunk: int, time_axis) -> tuple:
    shape = []
    for axis, dim in enumerate(t.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == "batch":
            shape.append(batch)
        elif axis == time_axis:
            shape.append(chunk)
        else:
            raise UsageError(
                f"input {t.name!r} has a dynamic axis {dim!r} that is neither batch nor time; "
                "rnnedge bench cannot choose its size"
            )
    return tuple(shape)


def token_range(graph, t: TensorSpec) -> tuple[int, int]:
    """[low, high) for integer input ``t``: the contract's ``range``, or for files written
    before it was recorded, the rows of the embedding table the input indexes."""
    if t.range is not None:
        return t.range
    import onnx

    return 0, _vocab_of(onnx.load_from_string(graph.data), t.name)


def make_inputs(graph, batch: int, chunk: int, count: int, plan=None) -> list[dict]:
    """``count`` seeded feeds {input name: array} for one call of ``batch`` rows, ``chunk`` steps.

    graph: a ``verify.GraphFile``. With a plan (``--against``), its own ``sample`` makes
    them (as the parity gate does); else standard-normal floats and in-range token ids
    (``token_range``).
    """
    spec = graph.contract
    rng = np.random.default_rng(SEED)
    step_graph = spec.time_axis is None
    ranges = {t.name: token_range(graph, t) for t in spec.data_inputs
              if plan is None and np.issubdtype(np.dtype(t.dtype), np.integer)}
    feeds = []
    for _ in range(count):
        if plan is not None:
            feed = plan.sample(rng, batch, None if step_graph else chunk)
        else:
            feed = {}
            for t in spec.data_inputs:
                shape = _input_shape(t, batch, chunk, spec.time_axis)
                if t.name in ranges:
                    feed[t.name] = rng.integers(*ranges[t.name], size=shape).astype(t.dtype)
                else:
                    feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
        if spec.has_lengths:  # sequence mode: every row is the whole chunk long
            feed["lengths"] = np.full(batch, chunk, dtype=np.int64)
        feeds.append(feed)
    return feeds
