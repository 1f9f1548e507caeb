"""An export described as data: names, shapes, state pairs, tolerances.

``ExportSpec`` is what ends up, as JSON, in the graph's ``rnnedge`` metadata entry
(see docs/contract.md). Shapes use strings for dynamic axes ("batch", "time") and
integers for fixed sizes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rnnedge.errors import UsageError

FORMAT = 1
METADATA_KEY = "rnnedge"
DEFAULT_OPSET = 18
MIN_OPSET = 14

Shape = tuple  # of int | str

#: Parity tolerances per dtype: (atol, rtol). A miss of |a-b| <= atol + rtol*|b| fails.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    # int8 weights, per-call uint8 activations (precision="int8"). Used by the int8 gate's
    # teacher-forced steps (precision.py): a working graph's step is off by <= 0.02, trained
    # models included; a swapped gate pair, a dropped bias or an ignored incoming state
    # misses by 0.2 and more (tests/test_precision.py breaks graphs on purpose).
    "int8": (5e-2, 5e-2),
}


@dataclass(frozen=True)
class TensorSpec:
    """One data input or output of the graph."""

    name: str
    dtype: str
    shape: Shape

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: graph input ``input`` before the call, ``output`` after."""

    input: str
    output: str
    dtype: str
    shape: Shape
    batch_axis: int
    init: str = "zeros"

    def as_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
            "init": self.init,
        }


@dataclass(frozen=True)
class ExportSpec:
    """The whole graph contract, less the parity figures (added once the gate has run)."""

    mode: str  # "stream" | "sequence"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    time_axis: int | None
    opset: int
    source: dict = field(default_factory=dict)

    def metadata(self, parity: dict | None = None) -> dict:
        return {
            "format": FORMAT,
            "mode": self.mode,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "states": [s.as_dict() for s in self.states],
            "time_axis": self.time_axis,
            "opset": self.opset,
            "source": dict(self.source),
            "parity": dict(parity or {}),
        }

    def metadata_json(self, parity: dict | None = None) -> str:
        return json.dumps(self.metadata(parity), sort_keys=False)

    def replace(self, **changes) -> ExportSpec:
        return dataclasses.replace(self, **changes)


def tolerance(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The (atol, rtol) for ``dtype``, each overridable by the caller."""
    if dtype not in TOLERANCES:
        raise UsageError(
            f"no parity tolerance for dtype {dtype}: expected one of {sorted(TOLERANCES)}; "
            "export a float32 model"
        )
    base_atol, base_rtol = TOLERANCES[dtype]
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not value >= 0:
            raise UsageError(f"{label} must be a number >= 0, got {value!r}")
    return (base_atol if atol is None else float(atol), base_rtol if rtol is None else float(rtol))


# onnxruntime 1.31 runs up to opset 26; graphs must load where they are gated.
RUNTIME_MAX_OPSET = 26


def max_opset() -> int:
    """The newest opset every part can handle: onnx, onnxscript's opset modules (whole
    models are translated through them) and onnxruntime."""
    import onnx
    import onnxscript

    scripted = max(n for n in range(MIN_OPSET, 40) if hasattr(onnxscript, f"opset{n}"))
    return min(onnx.defs.onnx_opset_version(), scripted, RUNTIME_MAX_OPSET)


def check_opset(opset: int | None) -> int:
    """The opset to use: ``DEFAULT_OPSET`` when None, else a validated integer."""
    if opset is None:
        return DEFAULT_OPSET
    newest = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UsageError(
            f"opset must be an integer from {MIN_OPSET} to {newest}, got {opset!r}; "
            f"leave it out for the default ({DEFAULT_OPSET})"
        )
    return opset
