"""Range constraints: a batch or time axis that torch.export bounded (Python arithmetic on a
size, e.g. padding to ``math.ceil(T / 4) * 4``), read from the traced program and, for
torch's own words, from a second ``torch.export`` run with named Dims; such a graph would
be right at those sizes only, so it is an ExportError, never a written graph."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rnnedge.errors import ExportError
from rnnedge.exporters.torchonnx import quiet


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
        with quiet():
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
