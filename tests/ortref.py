"""An independent reader of rnnedge graphs for tests: plain onnxruntime + the metadata.

Deliberately shares no code with rnnedge's gate or runtime, so that a bug there cannot
hide itself in the tests.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort


def contract(path) -> dict:
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props["rnnedge"])


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def zero_states(meta: dict, batch: int) -> dict:
    out = {}
    for s in meta["states"]:
        shape = [batch if i == s["batch_axis"] else d for i, d in enumerate(s["shape"])]
        out[s["input"]] = np.zeros(shape, dtype=s["dtype"])
    return out


def call(sess, meta: dict, inputs: dict, states: dict):
    """One graph call: returns (outputs by name, states by input name)."""
    out_names = [o["name"] for o in meta["outputs"]] + [s["output"] for s in meta["states"]]
    values = sess.run(out_names, {**inputs, **states})
    n = len(meta["outputs"])
    outs = dict(zip(out_names[:n], values[:n]))
    new = {s["input"]: v for s, v in zip(meta["states"], values[n:])}
    return outs, new


def stream(sess, meta: dict, inputs: dict, states: dict, chunks):
    """Feed ``inputs`` along the time axis in ``chunks`` sizes, carrying the state."""
    axis = meta["time_axis"]
    start, pieces = 0, []
    for size in chunks:
        part = {k: np.ascontiguousarray(np.take(v, range(start, start + size), axis=axis))
                for k, v in inputs.items()}
        outs, states = call(sess, meta, part, states)
        pieces.append(outs)
        start += size
    assert start == next(iter(inputs.values())).shape[axis], "chunks must cover the input"
    joined = {k: np.concatenate([p[k] for p in pieces], axis=axis) for k in pieces[0]}
    return joined, states
