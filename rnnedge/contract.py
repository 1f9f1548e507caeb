"""An export described as data: names, shapes, state pairs, tolerances.

``ExportSpec`` is what ends up, as JSON, in the graph's ``rnnedge`` metadata entry
(see docs/contract.md). Shapes use strings for dynamic axes ("batch", "time") and
integers for fixed sizes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FORMAT = 1
METADATA_KEY = "rnnedge"

Shape = tuple  # of int | str

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
