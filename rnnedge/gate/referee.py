"""The float64 referee: the plan's eager reference run with the model in float64.

float32 eager is not the truth either: over long runs its rounding error grows like the
graph's, so judging the graph against float32 eager alone punishes it for float32 itself.
Where the model runs in float64 the gate judges the graph against that run, allowing
float32 eager's own error on the same case (``compare``). The model is converted in
place for the run and back afterwards: float32 -> float64 -> float32 is lossless, and a
model whose floating parameters or buffers are not all float32 is not converted at all.
Float inputs and states are cast to float64, integer inputs are left as they are. A
model that cannot run in float64 (a float32 tensor made inside forward() meeting a
float64 one, say) has no referee: the gate falls back to float32 eager alone.
Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np


def to_float64(arrays: dict) -> dict:
    """``arrays`` with every float array cast to float64 (a copy), others as they are."""
    return {k: (np.array(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else v)
            for k, v in arrays.items()}


def _all_float32(model) -> bool:
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    return all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())


@contextlib.contextmanager
def in_float64(model) -> Iterator[None]:
    """``model`` in float64 meanwhile, and back in float32 afterwards (also on errors)."""
    model.double()
    try:
        yield
    finally:
        model.float()


def float64_referee(model, reference) -> Callable | None:
    """A referee for ``case_arrays``: ``referee(run)`` calls ``run(reference64)`` with
    ``model`` in float64, where ``reference64`` is ``reference`` on float64 copies of the
    inputs and states; it returns what ``run`` returns, or None when the model cannot run
    in float64. None when there is no model or it is not all float32."""
    if model is None or not hasattr(model, "double") or not _all_float32(model):
        return None

    def reference64(inputs: dict, states: dict):
        return reference(to_float64(inputs), to_float64(states))

    def referee(run):
        try:
            with in_float64(model):
                return run(reference64)
        except Exception:  # noqa: BLE001 - any failure in float64 means: no referee
            return None

    return referee
