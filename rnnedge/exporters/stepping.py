"""Step-protocol modules: finding the state of ``forward(*inputs, state) -> (output, state)``.

``state`` is a tensor or a nested tuple/list of tensors (e.g. the classic Elman char-RNN, a
cell stack, a feature front-end around an ``nn.LSTMCell``). The initial state is found, in
this order, from an ``init_hidden`` / ``init_state`` / ``init_states`` / ``initHidden``
method (with a batch-size argument, or without one when the state has a batch axis of
size 1), else from ``forward(*inputs, None)``; it must be all zeros (the contract's
``init``). Each state tensor needs exactly one batch axis: the axis that follows the batch
size between batch 2 and batch 3 (or, for an init method without a batch-size argument,
its axis of size 1, checked by running forward at batch 2).

The graph takes the data inputs, then one input per state tensor in pytree (depth-first)
order, and gives the outputs, then the state tensors in the same order. State names:
``state`` -> ``state_out`` for a single tensor, else ``state.0`` -> ``state.0_out``,
``state.1`` -> ``state.1_out``, ...

``PROTOCOL`` is the one-line description of what rnnedge exports, shared by the errors of
both forms (see ``forms``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.contract import StateSpec
from rnnedge.errors import UnsupportedModelError, first_line
from rnnedge.exporters.inputs import resize

INIT_METHODS = ("init_hidden", "init_state", "init_states", "initHidden")
#: Names of forward's state parameter, bound by name (never by position): RNN-T's
#: predictor is forward(input, lengths, state).
STATE_PARAMS = ("state", "states", "hidden", "hx", "h", "carry", "hidden_state", "h0")


class StepProbeError(UnsupportedModelError):
    """A step-protocol forward failed or was not deterministic while its state was being
    found: the model's own fault, reported rather than taken as "not a step module"."""
# Eager-vs-eager check (lifted state at zero vs the model's own forward): same math.
SELF_ATOL, SELF_RTOL = 1e-6, 1e-5

PROTOCOL = (
    "rnnedge exports either a model built on PyTorch's recurrent layers (nn.RNN/LSTM/GRU "
    "or their cells; their state is carried between calls for you) or a step-protocol "
    "module forward(x, state) -> (output, state) with an init_hidden(batch_size) method "
    "(or a forward(x, None) that returns the initial output and state)"
)


@dataclass
class StepState:
    """A step-protocol module's state: its nesting and each tensor's shape and batch axis."""

    treespec: object
    shapes: list[tuple]  # with "batch" at the batch axis
    batch_axes: list[int]
    names: list[tuple[str, str]]
    arg: str | None = None  # forward's state parameter, passed by keyword; None: last

    def zeros(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros([batch if d == "batch" else d for d in s]) for s in self.shapes]

    def build(self, leaves):
        return pytree.tree_unflatten(list(leaves), self.treespec)

    def specs(self) -> list[StateSpec]:
        return [StateSpec(i, o, "float32", s, ax)
                for (i, o), s, ax in zip(self.names, self.shapes, self.batch_axes)]


def positional_params(model: nn.Module) -> tuple[int | None, int]:
    """(positional parameters of forward or None for *args, how many are required)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None, 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None, sum(p.kind in kinds and p.default is p.empty for p in params)
    pos = [p for p in params if p.kind in kinds]
    return len(pos), sum(p.default is p.empty for p in pos)


def state_param(model: nn.Module, state_arg: str | None = None) -> str | None:
    """The name of forward's state parameter: ``state_arg`` when given, else a parameter
    named like a state (``STATE_PARAMS``) or annotated as one (its annotation's text names
    "state"/"hidden"); None when there is none (the state then follows the inputs)."""
    if state_arg is not None:
        return state_arg
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for p in params:
        if p.name in STATE_PARAMS:
            return p.name
    for p in params:
        text = str(p.annotation).lower() if p.annotation is not p.empty else ""
        if "state" in text or "hidden" in text:
            return p.name
    return None


def call_step(model: nn.Module, inputs, state, arg: str | None):
    """``model(*inputs, state)``, the state bound to forward's parameter ``arg`` by name."""
    if arg is None:
        return model(*inputs, state)
    return model(*inputs, **{arg: state})


def init_method(model: nn.Module):
    for name in INIT_METHODS:
        fn = getattr(model, name, None)
        if callable(fn):
            return name, fn
    return None


def _leaves(obj, what: str) -> tuple[list, object]:
    leaves, spec = pytree.tree_flatten(obj)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UnsupportedModelError(
            f"{what} must be a tensor or a nested tuple/list of tensors, got "
            f"{type(obj).__name__}; {PROTOCOL}"
        )
    return leaves, spec


def split_step(out, what: str):
    """(outputs, state) from what a step-protocol forward returned: the state is last."""
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise UnsupportedModelError(
            f"{what} returned {type(out).__name__}, not (output, state); {PROTOCOL}"
        )
    ys = out[0] if len(out) == 2 else tuple(out[:-1])
    return ys, out[-1]


def _state_names(n: int) -> list[tuple[str, str]]:
    if n == 1:
        return [("state", "state_out")]
    return [(f"state.{i}", f"state.{i}_out") for i in range(n)]


def _batch_axes(a: list, b: list, na: int, nb: int, what: str) -> list[int]:
    axes = []
    for k, (x, y) in enumerate(zip(a, b)):
        diff = [i for i in range(x.dim()) if x.shape[i] != y.shape[i]]
        if x.dim() != y.dim() or len(diff) != 1 or (x.shape[diff[0]], y.shape[diff[0]]) != (na, nb):
            raise UnsupportedModelError(
                f"could not find the batch axis of state tensor {k} from {what} (shapes "
                f"{tuple(x.shape)} at batch {na}, {tuple(y.shape)} at batch {nb}); every state "
                "tensor needs exactly one axis that follows the batch size"
            )
        axes.append(diff[0])
    return axes


def _check_zero(leaves, what: str) -> None:
    for t in leaves:
        if t.dtype != torch.float32:
            raise UnsupportedModelError(f"{what} gives a {t.dtype} state tensor; rnnedge carries float32 states")
        if bool(torch.any(t != 0)):
            raise UnsupportedModelError(
                f"{what} gives a non-zero initial state; the graph contract starts every "
                "stream from zeros: make the initial state zeros (a learned initial state can "
                "be added inside forward)"
            )


def discover_state(model, batch_probe) -> StepState:
    """The step-protocol state, from an init method or from forward(x, None)."""
    found = init_method(model)
    with torch.no_grad():
        if found is not None:
            name, fn = found
            takes_batch = _positional_count(fn) > 0
            if takes_batch:
                s2, spec = _leaves(_call_init(fn, name, 2), f"{name}(2)")
                s3, spec3 = _leaves(_call_init(fn, name, 3), f"{name}(3)")
                if spec3 != spec:
                    raise UnsupportedModelError(f"{name}() nests its state differently at batch 2 and 3")
                _check_zero(s2, f"{name}(2)")
                axes = _batch_axes(s2, s3, 2, 3, f"{name}(batch_size)")
                _check_deterministic(batch_probe, "forward(x, state)",
                                     lambda: pytree.tree_unflatten(list(s2), spec))
            else:
                s1, spec = _leaves(_call_init(fn, name), f"{name}()")
                _check_zero(s1, f"{name}()")
                axes = [_guess_batch_axis(t) for t in s1]
                if None in axes:
                    raise UnsupportedModelError(
                        f"{name}() takes no batch size and its state {[tuple(t.shape) for t in s1]} "
                        "has no axis of size 1 to be the batch; give it a batch_size argument"
                    )
                s2 = [resize(t, ax, 2) for t, ax in zip(s1, axes)]
                try:
                    out = batch_probe(2, pytree.tree_unflatten(s2, spec))
                    _, st = split_step(out, "forward(x, state)")
                    got = [tuple(t.shape) for t in pytree.tree_leaves(st)]
                except UnsupportedModelError:
                    raise
                except Exception:  # noqa: BLE001 - a guess that does not run is a wrong guess
                    got = None
                if got != [tuple(t.shape) for t in s2]:
                    raise UnsupportedModelError(
                        f"could not find the batch axis of the state {name}() gives "
                        f"({[tuple(t.shape) for t in s1]}): forward at batch 2 did not keep it; "
                        "give it a batch_size argument: init_hidden(batch_size)"
                    )
        else:
            what = "forward(x, None)"
            _check_deterministic(batch_probe, what)
            _, st2 = split_step(batch_probe(2, None), what)
            _, st3 = split_step(batch_probe(3, None), what)
            s2, spec = _leaves(st2, f"the state {what} returns")
            s3, _ = _leaves(st3, f"the state {what} returns")
            axes = _batch_axes(s2, s3, 2, 3, what)
            zeros = [torch.zeros_like(t) for t in s2]
            with_none = pytree.tree_leaves(split_step(batch_probe(2, None), what)[0])
            with_zeros = pytree.tree_leaves(
                split_step(batch_probe(2, pytree.tree_unflatten(zeros, spec)), what)[0])
            if len(with_none) != len(with_zeros) or not all(
                    torch.allclose(a, b, atol=SELF_ATOL, rtol=SELF_RTOL)
                    for a, b in zip(with_none, with_zeros)):
                raise UnsupportedModelError(
                    "forward(x, None) does not equal forward(x, zero state): the model starts "
                    "from a non-zero state, but the graph contract starts every stream from "
                    "zeros; give the model an init_hidden(batch_size) returning zeros"
                )
    shapes = [tuple("batch" if i == ax else int(d) for i, d in enumerate(t.shape))
              for t, ax in zip(s2, axes)]
    return StepState(spec, shapes, axes, _state_names(len(s2)))


def _call_init(fn, name: str, *batch):
    try:
        return fn(*batch)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        first = first_line(exc, fallback="")
        call = f"{name}({', '.join(map(str, batch))})"
        raise UnsupportedModelError(
            f"{call} failed ({type(exc).__name__}: {first}); rnnedge calls the init method "
            "with the batch size as its only argument (or with none), and it must return the "
            "zero state on the CPU"
        ) from exc


def _positional_count(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return sum(p.kind in kinds for p in params)


def _guess_batch_axis(t: torch.Tensor) -> int | None:
    """Batch axis of a state made for batch 1: (layers, 1, hidden) -> 1, (1, hidden) -> 0."""
    if t.dim() == 3 and t.shape[1] == 1:
        return 1
    ones = [i for i in range(t.dim()) if t.shape[i] == 1]
    return ones[0] if ones else None


def looks_like_step(out) -> bool:
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        return False
    leaves = pytree.tree_leaves(out[-1])
    return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves)


def check_state_arg(model: nn.Module, state_arg: str) -> None:
    """Refuse (UsageError) a ``state_arg`` (``--state-arg``) that is not a parameter of
    forward. (Binding the state to it by name is this module's state discovery.)"""
    from rnnedge.errors import UsageError

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin): the first run tells
    if state_arg not in params:
        raise UsageError(f"state_arg {state_arg!r} is not a parameter of "
                         f"{type(model).__name__}.forward, which takes ({', '.join(params)}); "
                         "pass the name of its state parameter")


def _check_deterministic(batch_probe, what: str, state=lambda: None) -> None:
    """StepProbeError when two runs of ``what`` on the same input (at batch 2, from
    ``state()``) differ (dropout with training=True, random ops): no graph equals such a
    model."""
    # Each run gets its own copy of the state: a model may update it in place (acc += h).
    def fresh():
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state())

    first = pytree.tree_leaves(batch_probe(2, fresh()))
    again = pytree.tree_leaves(batch_probe(2, fresh()))
    worst = max((float((a - b).abs().max()) for a, b in zip(first, again)
                 if isinstance(a, torch.Tensor) and a.shape == b.shape and a.is_floating_point()),
                default=0.0)
    if worst > 0 or len(first) != len(again):
        raise StepProbeError(
            f"{what} gives different results on the same input (by up to {worst:.3g}): the "
            "step-protocol forward is not deterministic (e.g. F.dropout(x, training=True) or "
            "other random ops, which model.eval() does not turn off); no graph can equal it: "
            "make dropout follow self.training (nn.Dropout, or F.dropout(x, "
            "training=self.training))"
        )
