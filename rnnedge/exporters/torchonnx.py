"""Driving torch.onnx.export (dynamo) over a patched model, and the graph it gives.

``export_onnx`` runs torch.onnx.export with ``translations.translations`` (one fused ONNX node
per recurrent layer), quiet; lifts constants to initializers and drops metadata; refuses
a graph with non-standard operators; converts down to an opset below 18 (torch.onnx
builds at >= 18). When torch.export fixes a dynamic axis to the example's size it raises
``Specialized`` (which graph input, which axis, at what size) so that the caller can say
which axis of which input was fixed. When it merely *bounds* one (a range such as
``VR[2, 12]``, from Python arithmetic on the length: the graph is then right inside the
range only), ``check_ranges`` refuses the graph, naming the bound and torch's own guard
(re-exported with named ``torch.export.Dim``s, which makes torch explain it). Failures
say which step failed: tracing (torch.export), the ONNX translation (with the aten op), or
onnx's conversion. ``dim_values`` / ``set_shape`` read and declare the graph's input and
output shapes.

Modules: ``trace`` (the custom ops and the patched layers), this one (the torch.onnx run),
``ranges`` (the range check on the program it traced).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator

import onnx
import onnx.version_converter
import torch
from torch import nn

from rnnedge.errors import ExportError, RnnedgeError
from rnnedge.exporters.sourceline import model_frame
from rnnedge.exporters.translations import translations

IR_VERSION = 10  # what the exporter writes; runtimes lag behind onnx

_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript",
                  "onnx_ir", "torch._dynamo", "torch.utils._sympy", "torch._subclasses")
_SPECIALIZED = re.compile(r"static shape of (\d+) for dimension inputs\['flat'\]\[(\d+)\]"
                          r"\.shape\[(\d+)\]")


class Specialized(ExportError):
    """torch.export fixed a dynamic axis: graph input ``index``, ``axis``, at ``size``."""

    def __init__(self, message: str, index: int, axis: int, size: int):
        super().__init__(message)
        self.index, self.axis, self.size = index, axis, size


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    levels = {}
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.CRITICAL + 1)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _rnnedge_cause(exc: BaseException) -> RnnedgeError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RnnedgeError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _root(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    root = _root(exc)
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else ''}"[:300]


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


# torch.onnx's error classes (torch/onnx/_internal/exporter/_errors.py), matched by name:
# the module is private. ConversionError and its subclasses: the ONNX translation failed.
_TRANSLATION_ERRORS = ("ConversionError", "DispatchError", "GraphConstructionError")
_TARGET = re.compile(r"target=torch\.ops\.([\w.]+)|No ONNX function found for <OpOverload\(op='([\w.]+)', "
                     r"overload='(\w+)'")


def failure(exc: BaseException, what: str) -> ExportError:
    """The one-line ExportError for a failed torch.onnx.export: which step failed (tracing
    by torch.export, or the ONNX translation, with the aten op torch names) and why."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    if names & set(_TRANSLATION_ERRORS):
        op = None
        for e in chain:
            found = _TARGET.search(str(e))
            if found:
                op = found.group(1) or f"{found.group(2)}.{found.group(3)}"
                break
        at = f" at {op}" if op else ""
        return ExportError(
            f"torch.export traced {what}, but the ONNX translation failed{at} "
            f"({_first_line(exc)}); torch.onnx has no ONNX translation for that operation "
            "here: compute it with other tensor ops in forward(), or keep it outside the "
            "exported model"
        )
    where = model_frame(chain)
    at = f" at {where}" if where else ""
    return ExportError(
        f"torch.export could not trace {what} ({_first_line(exc)}){at}; make forward() "
        "traceable by torch.export (no Python control flow on tensor values, no "
        "numpy/.item() calls), or write the model as a step-protocol module "
        "forward(x, state) -> (output, state)"
    )


def export_onnx(wrapper: nn.Module, args: tuple, dynamic_shapes, input_names, output_names,
                opset: int, what: str, max_length: int | None = None,
                min_length: int | None = None) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with rnnedge's translations, cleaned up; ExportError on failure.

    The wrapper's forward takes ``*flat`` tensors; ``dynamic_shapes`` is ``(({axis: name},
    ...),)``, one dict per flat tensor. torch.onnx builds at opset >= 18; an older opset is
    reached with onnx's version converter afterwards. max_length: the longest time the
    graph must take, as the user gave it (None: no limit), min_length the shortest: a time
    axis torch.export bounded below max_length (None: at all) or above min_length (a batch
    axis: bounded at all) is an ExportError (``check_ranges``).
    """
    import onnx_ir
    import onnx_ir.passes.common as passes

    build_opset = max(opset, 18)
    try:
        with quiet():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                custom_translation_table=translations(build_opset), opset_version=build_opset,
                input_names=list(input_names), output_names=list(output_names),
                optimize=True, verbose=False, external_data=False,
            )
    except Exception as exc:  # noqa: BLE001 - anything torch.onnx raises is a failed export
        ours = _rnnedge_cause(exc)
        if ours is not None:
            raise ours.with_traceback(None) from None
        fixed = _SPECIALIZED.search(str(_root(exc)))
        if fixed:
            size, index, axis = (int(g) for g in fixed.groups())
            raise Specialized(f"tracing fixed axis {axis} of input {index} at {size}",
                              index, axis, size) from exc
        raise failure(exc, what) from exc
    exported = getattr(program, "exported_program", None)
    if exported is not None:
        from rnnedge.exporters.ranges import check_ranges  # it runs torch.export: beside us

        check_ranges(exported, wrapper, args, dynamic_shapes, input_names, what, max_length,
                     min_length)
    model = program.model
    for p in (passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              passes.DeduplicateInitializersPass(size_limit=1 << 40),
              passes.RemoveUnusedNodesPass(),
              passes.ClearMetadataAndDocStringPass()):
        p(model)
    proto = onnx_ir.serde.serialize_model(model)
    del proto.metadata_props[:]
    domains = {o.domain for o in proto.opset_import if o.domain not in ("", "ai.onnx")}
    domains |= {n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    if domains or proto.functions:
        raise ExportError(
            f"the traced graph of {what} uses operators outside standard ONNX "
            f"({', '.join(sorted(domains)) or 'local functions'}); this is an rnnedge bug: "
            "please report it with the model"
        )
    if opset != build_opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain RuntimeErrors
            raise ExportError(
                f"torch.export and the ONNX translation of {what} succeeded, but onnx could "
                f"not convert the graph to opset {opset} ({_first_line(exc)}); leave the "
                "opset out for the default (18)"
            ) from exc
    got = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if got != {opset}:
        raise ExportError(
            f"the graph of {what} came out at opset {sorted(got)}, not {opset}; leave the "
            "opset out for the default (18)"
        )
    proto.producer_name = "rnnedge"
    proto.producer_version = ""
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    return proto


def dim_values(proto: onnx.ModelProto) -> dict[str, list]:
    """Graph input name -> per axis its dim_param (str) or dim_value (int)."""
    out = {}
    for vi in proto.graph.input:
        out[vi.name] = [d.dim_param if d.dim_param else d.dim_value
                        for d in vi.type.tensor_type.shape.dim]
    return out


def set_shape(vi: onnx.ValueInfoProto, shape) -> None:
    """Declare ``shape`` (ints fixed, strings dynamic) on a graph input or output."""
    tshape = vi.type.tensor_type.shape
    del tshape.dim[:]
    for d in shape:
        dim = tshape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)
