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

Modules: ``trace`` (the custom ops and the patched layers), this one (the torch.onnx run).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

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
def _quiet() -> Iterator[None]:
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
        with _quiet():
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


# ---------------------------------------------------------------------------
# Range constraints: an axis torch.export bounded (Python arithmetic on a size)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """A dynamic axis torch.export bounded: graph input ``name``'s ``axis`` (``label``:
    "batch" or "time") only takes ``low``..``high``."""

    name: str
    axis: int
    label: str
    low: int
    high: int | None  # None: bounded below only

    @property
    def range_text(self) -> str:
        return f"VR[{self.low}, {self.high}]"


def ranges(exported, dynamic_shapes) -> list[tuple[int, int, str, object, object]]:
    """(flat input index, axis, axis name, lower, upper) of every dynamic axis, read from
    the exported program's user-input placeholders (their SymInt sizes) and its
    ``range_constraints``; an axis whose size is an expression or a constant is skipped."""
    dyn = list(dynamic_shapes[0]) if dynamic_shapes else []
    user = list(exported.graph_signature.user_inputs)
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    out = []
    for index, (axes, name) in enumerate(zip(dyn, user)):
        val = nodes[name].meta.get("val") if name in nodes else None
        if val is None or not axes:
            continue
        for axis, label in axes.items():
            size = val.shape[axis]
            expr = getattr(getattr(size, "node", None), "expr", None)
            vr = exported.range_constraints.get(expr) if expr is not None else None
            if vr is not None:
                out.append((index, axis, str(label), vr.lower, vr.upper))
    return out


def floor_of(label: str, min_length: int | None) -> int:
    """The lowest size an axis must take: 2 (torch.export specialises 0 and 1 whatever it
    is told), and for time the gate's shortest length where that is more."""
    return max(2, min_length or 0) if label == "time" else 2


def is_bounded(bound: Bound, max_length: int | None, min_length: int | None) -> bool:
    """Whether ``bound`` keeps the graph from sizes it must take: a batch axis bounded above
    at all; a time axis bounded above below ``max_length`` (None, the user gave none: at
    any size), or to a window above the shortest length (VR[1957, 2044] from an example of
    2000 steps). A lower bound alone is no verdict: a stream graph's strided convolutions
    need a few steps per call, which torch.export states conservatively; the gate's
    lengths show whether the graph takes them."""
    if bound.high is None:
        return False
    if bound.low > floor_of(bound.label, min_length):
        return True
    return bound.label != "time" or max_length is None or bound.high < max_length


def bounds(exported, dynamic_shapes, input_names, max_length: int | None,
           min_length: int | None = None) -> list[Bound]:
    """The dynamic axes torch.export bounded (``is_bounded``)."""
    import sympy

    found = []
    for index, axis, label, lower, upper in ranges(exported, dynamic_shapes):
        high = int(upper) if isinstance(upper, sympy.Integer) else None  # int_oo: unbounded
        if high is not None and high >= 2**31:  # an int32/int64 limit, not the model's
            high = None
        low = int(lower) if isinstance(lower, sympy.Integer) else 0
        bound = Bound(input_names[index], axis, label, low, high)
        if is_bounded(bound, max_length, min_length):
            found.append(bound)
    return found


_VIOLATED = re.compile(r"Constraints violated \(([^)]*)\)")
_WHERE = re.compile(r"L\['flat'\]\[(\d+)\]\.size\(\)\[(\d+)\]")
_FIX = re.compile(r"^(\w+) = (?:(\d+)|Dim\('\w+'(?:, min=(\d+))?(?:, max=(\d+))?\))$")


def named_export(wrapper: nn.Module, args: tuple, dynamic_shapes):
    """(torch.export.export's program or None, its constraint-violation text or "") for
    ``wrapper`` with named Dims ("batch", "time") and torch's default size handling.

    torch.onnx captures with ``backed_size_oblivious``, under which Python arithmetic on a
    size (math.ceil(T / 4)) is silently traced at the example's value; named Dims make
    torch.export check every guard on them and name the one that does not hold for all
    sizes. Any other failure gives (None, ""): torch.onnx's own capture succeeded."""
    dims = {"batch": torch.export.Dim("batch"), "time": torch.export.Dim("time")}
    named = tuple({axis: dims.get(str(a), torch.export.Dim.AUTO) for axis, a in axes.items()}
                  for axes in dynamic_shapes[0])
    try:
        with _quiet():
            return torch.export.export(wrapper, tuple(args), dynamic_shapes=(named,),
                                       strict=False), ""
    except Exception as exc:  # noqa: BLE001 - only a constraint violation is a verdict
        text = str(exc)
        return None, (text if _VIOLATED.search(text) else "")


def violation_bound(text: str, input_names, max_length: int | None) -> tuple[Bound, str]:
    """(the bound, torch's guard line) read from a constraint-violation ``text``."""
    lines = [ln.strip().removeprefix("- ").strip() for ln in text.splitlines()]
    labels = [x.strip() for x in _VIOLATED.search(text).group(1).split(",")]
    label = "time" if "time" in labels else labels[0]
    guards = [ln for ln in lines if ln.startswith("Not all values of")]
    # The guard that bounds the axis rather than the range it implies ("2 <= ... <= 12").
    guard = next((g for g in guards if f"{label} =" in g and " <= " not in g.rsplit("guard", 1)[-1]),
                 guards[0] if guards else "")
    where = _WHERE.search(guard) or _WHERE.search(text)
    index, axis = (int(where.group(1)), int(where.group(2))) if where else (0, -1)
    low, high = 0, None
    for line in lines:
        fix = _FIX.match(line)
        if fix and fix.group(1) == label:
            if fix.group(2):
                low = high = int(fix.group(2))
            else:
                low, high = int(fix.group(3) or 2), (int(fix.group(4)) if fix.group(4) else None)
            break
    name = input_names[index] if index < len(input_names) else f"input {index}"
    return Bound(name, axis, label, low, high), guard.rstrip(".")[:300]


def check_ranges(exported, wrapper: nn.Module, args: tuple, dynamic_shapes, input_names,
                 what: str, max_length: int | None, min_length: int | None = None) -> None:
    """Refuse a graph whose batch or time axis torch.export bounded or fixed (ExportError):
    the graph would be right inside the bound only (e.g. padding to a length computed in
    Python). Read from torch.onnx's program, then from a named-Dim torch.export run."""
    found = bounds(exported, dynamic_shapes, input_names, max_length, min_length)
    program, violation = None, ""
    if not found:
        program, violation = named_export(wrapper, args, dynamic_shapes)
        if violation:
            bound = violation_bound(violation, input_names, max_length)[0]
            # A guard that only excludes some sizes (e.g. a padding of zero: T % 4 != 0)
            # bounds nothing: the gate's lengths cover both sides of it.
            found = [bound] if is_bounded(bound, max_length, min_length) else []
        elif program is not None:
            found = bounds(program, dynamic_shapes, input_names, max_length, min_length)
    if not found:
        return
    if not violation:  # found in the program's ranges: torch's own words name the guard
        violation = named_export(wrapper, args, dynamic_shapes)[1]
    guard = violation_bound(violation, input_names, max_length)[1] if violation else ""
    bound = found[0]
    unit = "steps" if bound.label == "time" else "rows"
    axis = f" (axis {bound.axis})" if bound.axis >= 0 else ""
    floor = floor_of(bound.label, min_length)
    if bound.high is None:
        extent = f"to at least {bound.low} {unit}"
    elif bound.high == bound.low:
        extent = f"at {bound.high} {unit}"
    elif bound.low > floor:
        extent = f"to {bound.low}..{bound.high} {unit} ({bound.range_text})"
    else:
        extent = f"to at most {bound.high} {unit} ({bound.range_text})"
    below = (f", below the {max_length} steps asked for" if bound.label == "time"
             and max_length and bound.high is not None else "")
    limit = (f"; if the model really takes at most {bound.high} steps, pass --max-length "
             f"{bound.high} (max_length={bound.high})" if bound.label == "time"
             and not max_length and bound.high is not None and bound.low <= floor else "")
    says = f"; torch says: {guard}" if guard else ""
    raise ExportError(
        f"torch.export bounded the {bound.label} axis{axis} of {bound.name} {extent}{below} "
        f"while tracing {what}, so the graph would be right at those sizes only{says}; "
        "typically Python arithmetic on the length (math.ceil(T / 4), int(T * r), a float "
        "division) that torch.export can only trace for some lengths: compute it with integer "
        "arithmetic on the size ((T + 3) // 4 * 4) or tensor ops, or export with fixed sizes "
        f"(no 'time' in input_axes / --input-shape){limit}; nothing was written"
    )
