"""Does a NaN in the input come out of the graph? A fact for the graph's contract.

Eager PyTorch carries a NaN in the input into the outputs and the state; onnxruntime's
CPU LSTM/GRU kernels turn it into plausible finite numbers and a finite state. Neither is
an error in the graph, but an app must know which one it has, so the gate records it
(metadata ``parity.nan_propagates``) and the runtime refuses non-finite inputs anyway
(``check_finite``, docs/runtime.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rnnedge.gate.cases import SEED

if TYPE_CHECKING:
    from rnnedge.gate.plan import Plan

STEPS = 3  # time steps of the probe's input, for graphs with a time axis


def nan_propagates(plan: Plan, model_bytes: bytes, providers=("CPUExecutionProvider",), *,
                   session=None, steps: int = STEPS) -> bool | None:
    """Whether a NaN in the first float data input gives a NaN/inf in some output or new state.

    The graph runs once with onnxruntime (``session`` when given, else a new one on
    ``providers``) at batch 1 (``steps`` time steps, or one step for a step graph), zero state, the plan's seeded sample with its first element set to NaN.
    Returns None when the graph has no float data input (nothing to probe). Raises what
    onnxruntime raises if the graph cannot run (the gate has run it before this).
    """
    import onnxruntime as ort

    spec = plan.spec
    rng = np.random.default_rng(SEED)
    inputs = plan.sample(rng, 1, None if spec.time_axis is None else steps)
    floats = [t.name for t in spec.inputs
              if t.name in inputs and np.asarray(inputs[t.name]).dtype.kind == "f"]
    if not floats:
        return None
    poisoned = np.array(inputs[floats[0]], copy=True)
    poisoned.reshape(-1)[0] = np.nan
    inputs = {**inputs, floats[0]: poisoned}
    if plan.lengths_input:
        inputs[plan.lengths_input] = np.full(1, steps if spec.time_axis is not None else 1,
                                             dtype=np.int64)
    states = {s.input: np.zeros([1 if i == s.batch_axis else d for i, d in enumerate(s.shape)], s.dtype)
              for s in spec.states}
    if session is None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, opts, providers=list(providers))
    names = [t.name for t in spec.outputs] + [s.output for s in spec.states]
    values = session.run(names, {**inputs, **states})
    return any(not np.isfinite(v).all() for v in values if np.asarray(v).dtype.kind == "f")
