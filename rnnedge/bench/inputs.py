"""Seeded inputs for the engines: the same pre-made feeds for every engine of a measurement."""

from __future__ import annotations

import numpy as np

from rnnedge.errors import UsageError

SEED = 20261127


def _vocab_of(model, name: str) -> int:
    """Rows of the embedding table an int64 input indexes (1 when it cannot be told)."""
    inits = {i.name: i for i in model.graph.initializer}
    sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
             if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) >= 1
             and (n.input[1] == name)]
    if not sizes:  # indices may pass through a Cast or Reshape first: any embedding table
        sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
                 if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return int(min(sizes)) if sizes else 1


def _input_shape(t: dict, batch: int, chunk: int, time_axis) -> tuple:
    shape = []
    for axis, dim in enumerate(t["shape"]):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == "batch":
            shape.append(batch)
        elif axis == time_axis:
            shape.append(chunk)
        else:
            raise UsageError(
                f"input {t['name']!r} has a dynamic axis {dim!r} that is neither batch nor time; "
                "rnnedge bench cannot choose its size"
            )
    return tuple(shape)


def make_inputs(graph, batch: int, chunk: int, count: int, plan=None) -> list[dict]:
    """``count`` seeded feeds {input name: array} for one call of ``batch`` rows, ``chunk`` steps.

    With a plan (``--against``), its own ``sample`` makes them (as the parity gate does);
    else standard-normal floats and in-range token ids from the contract.
    """
    import onnx

    meta = graph.meta
    rng = np.random.default_rng(SEED)
    time_axis = meta.get("time_axis")
    step_graph = time_axis is None
    proto = None
    feeds = []
    for _ in range(count):
        if plan is not None:
            feed = plan.sample(rng, batch, None if step_graph else chunk)
        else:
            feed = {}
            for t in graph.data_inputs:
                shape = _input_shape(t, batch, chunk, time_axis)
                if np.issubdtype(np.dtype(t["dtype"]), np.integer):
                    if proto is None:
                        proto = onnx.load_from_string(graph.data)
                    feed[t["name"]] = rng.integers(0, _vocab_of(proto, t["name"]), size=shape).astype(t["dtype"])
                else:
                    feed[t["name"]] = rng.standard_normal(shape).astype(t["dtype"])
        if graph.has_lengths:  # sequence mode: every row is the whole chunk long
            feed["lengths"] = np.full(batch, chunk, dtype=np.int64)
        feeds.append(feed)
    return feeds
