"""What one export builds and how the gate checks it: the ``Plan``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rnnedge.contract import ExportSpec

# Reference: (data inputs, states) -> (data outputs, states after), numpy in and out,
# dicts keyed by graph names (state dicts by the state's *input* name). Layouts are the
# contract's, e.g. input (batch, time, F) for a batch-first layer, state (layers, batch, H).
# It may wrap the arrays it is given with torch.from_numpy: the gate hands it copies.
Reference = Callable[[dict, dict], tuple[dict, dict]]
# Sample: (rng, batch, time or None) -> data inputs (lengths excluded); time None for
# step graphs, whose inputs have no time axis.
Sample = Callable[[np.random.Generator, int, "int | None"], dict]


@dataclass(frozen=True)
class Plan:
    """What one export builds and how the gate checks it.

    spec: the graph's contract (data inputs, outputs, state pairs, time axis).
    graph: the float32 onnx.ModelProto built from the model.
    reference / sample: eager PyTorch and the seeded input maker (see above).
    lengths_input: the name of the int64 per-row lengths input (batch,), if any.
    model: the nn.Module ``reference`` runs, if any: the gate runs ``reference`` once
    more with it in float64, as the referee (``gate.referee``); None: float32 eager only.
    """

    spec: ExportSpec
    graph: object  # onnx.ModelProto
    reference: Reference
    sample: Sample
    lengths_input: str | None = None
    model: object = None  # torch.nn.Module
