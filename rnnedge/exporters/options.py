"""``ExportOptions``: every option of ``rnnedge.export``, checked once before any work.

A bad option (an unknown mode or precision, an opset out of range, a negative tolerance,
a Triton repository in sequence mode) or an output that cannot be written (a folder, a
missing or read-only parent, a graph file inside the Triton repository) is a UsageError
raised before the model is traced: a typo should not cost a whole export. Importing this
module does not import torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rnnedge.errors import UsageError
from rnnedge.files import check_destination, inside
from rnnedge.gate.lengths import check_length_range
from rnnedge.graphs.opset import check_opset
from rnnedge.limits import check_tolerance
from rnnedge.precision import check_precision

MODES = ("stream", "sequence")


@dataclass(frozen=True)
class ExportOptions:
    """How to export, validated and normalised on construction (UsageError otherwise).

    mode: "stream" or "sequence". opset: None becomes the default opset. atol, rtol: None
    for the gate's defaults, else >= 0. lengths: None for the default (True for a bare
    nn.RNN/LSTM/GRU in sequence mode). input_axes: per data input, its axes, e.g.
    [("batch", "time", 16)]; checked against the model when planning. precision: "fp32",
    "fp16" or "int8" (case-insensitive). triton_repo, triton_name: a Triton repository to
    write too (stream mode only) and the model's name in it (None: the graph file's stem,
    filled in by ``with_destination``). progress: called with a short text per stage.
    min_length, max_length: the range of time steps the planner's probes and the parity
    gate use (None: the gate's defaults, rnnedge.gate.lengths); positive ints, min <= max.
    input_names: the data inputs' graph names, one per data input in forward order (None:
    ``input`` / ``input.N``). constants: names of data inputs constant per stream (no time
    axis; the contract marks them). state_arg: the name of forward's state parameter of a
    step-protocol module (None: found from the signature). states: "carried" (each
    layer's state a graph input/output) or "internal" (sequence mode only: every call
    starts from zero state inside the graph; no state inputs/outputs).
    """

    mode: str = "stream"
    opset: int | None = None
    atol: float | None = None
    rtol: float | None = None
    lengths: bool | None = None
    input_axes: list | tuple | None = None
    precision: str = "fp32"
    triton_repo: Path | None = None
    triton_name: str | None = None
    triton_backend: str = "onnxruntime"  # or "python" (rnnedge.triton.python_backend)
    progress: Callable[[str], None] | None = None
    min_length: int | None = None
    max_length: int | None = None
    input_names: tuple | None = None
    constants: tuple = ()
    state_arg: str | None = None
    states: str = "carried"

    def __post_init__(self):
        # Normalised values replace the given ones: the instance is frozen, hence __setattr__.
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "opset", check_opset(self.opset))
        object.__setattr__(self, "precision", check_precision(self.precision))
        check_length_range(self.min_length, self.max_length)
        for label in ("atol", "rtol"):
            value = getattr(self, label)
            if value is not None:  # inf would pass any graph, NaN none: both refused
                check_tolerance(label, value)
        for label in ("input_names", "constants"):
            value = getattr(self, label)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(x, str) and x for x in value):
                raise UsageError(f"{label} must be a list of input names, got {value!r}")
            object.__setattr__(self, label, tuple(value))
        if self.state_arg is not None and not (isinstance(self.state_arg, str) and self.state_arg):
            raise UsageError(f"state_arg must be a parameter name, got {self.state_arg!r}")
        if self.states not in ("carried", "internal"):
            raise UsageError(f"states must be 'carried' or 'internal', got {self.states!r}")
        if self.states == "internal" and self.mode != "sequence":
            raise UsageError("states='internal' (--state none) needs mode='sequence': a stream "
                             "carries its state from call to call")
        if self.progress is not None and not callable(self.progress):
            raise UsageError(f"progress must be a function of one text, got {type(self.progress).__name__}")
        if self.triton_backend not in ("onnxruntime", "python"):
            raise UsageError(f"triton_backend must be 'onnxruntime' or 'python', got "
                             f"{self.triton_backend!r}")
        if self.triton_repo is None:
            if self.triton_name is not None:
                raise UsageError("triton_name needs triton_repo (--triton-name needs --triton-repo)")
            return
        if self.mode != "stream":
            raise UsageError(
                "a Triton repository needs mode='stream': Triton's sequence batcher carries each "
                "stream's state from call to call; a sequence-mode graph takes whole sequences"
            )
        object.__setattr__(self, "triton_repo", Path(self.triton_repo))
        if self.triton_name is not None:
            from rnnedge.triton import check_name

            check_name(self.triton_name)

    def with_destination(self, path: str | os.PathLike) -> ExportOptions:
        """These options for a graph written at ``path``: the destinations checked (the
        graph file, the Triton repository apart from it) and the Triton name filled in."""
        options = self
        if self.triton_repo is not None:
            from rnnedge.triton import check_name, check_target

            name = check_name(Path(path).stem if self.triton_name is None else self.triton_name)
            check_target(self.triton_repo, name)
            if inside(path, self.triton_repo):  # anywhere in the repository, links resolved
                raise UsageError(
                    f"the graph file {path} would land in or on the Triton repository "
                    f"{self.triton_repo}; write it outside the repository (the repository gets "
                    "its own batch-first copy)"
                )
            options = dataclasses.replace(self, triton_name=name)
        check_destination(path)
        return options
