"""Loading ``torch.export`` programs (``.pt2``) as ordinary modules rnnedge can export.

``program.module()`` is an fx ``GraphModule`` in which every PyTorch recurrent layer has
become one ATen call: ``aten.lstm/gru/rnn_tanh/rnn_relu.input`` for nn.LSTM/GRU/RNN and
``aten.lstm_cell/gru_cell/rnn_tanh_cell/rnn_relu_cell`` for the cells (the table is
``rnnedge.recurrent.TYPES``). ``pt2_rewrite`` turns each back into the rebuilt module.

torch.export specialises input sizes (time-major LSTM/GRU cannot even be exported with a
dynamic time axis), and ``program.module()`` guards them: the guard call is removed, and
rnnedge's parity gate proves the graph at other batch sizes and lengths. The rewrite is
checked once on the program's stored example inputs against the unmodified program.

A program whose forward is ``forward(*inputs, state) -> (*outputs, state)`` (same state
structure and shapes in and out, e.g. an Elman char-RNN around an ``nn.RNNCell``) is
wrapped in ``ProgramStep``, whose ``init_hidden(batch_size)`` gives zeros shaped like the
example state with its batch axis resized. A bare layer's program gives the rebuilt layer
itself, exported as a bare layer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rnnedge.errors import ExportError, ModelLoadError, first_line
from rnnedge.loaders.pt2_rewrite import WAY_OUT, bare_layer, refuse_packed, rewrite
from rnnedge.recurrent import CELLS, type_of

# Self-check of the rewrite on the example inputs (same ATen kernels: tight).
ATOL, RTOL = 1e-5, 1e-4


class ProgramStep(nn.Module):
    """A step-protocol program ``forward(*inputs, state) -> (*outputs, state)`` with an init.

    init_hidden(batch_size) gives zeros shaped like the example state, its batch axes
    (``batch_axes``, one per state leaf) resized to ``batch_size``.
    """

    def __init__(self, program: nn.Module, state_example, batch_axes: list[int]):
        super().__init__()
        self.program = program
        leaves, self._spec = pytree.tree_flatten(state_example)
        self._shapes = [tuple(t.shape) for t in leaves]
        self._batch_axes = list(batch_axes)

    def forward(self, *args):
        return self.program(*args)

    def init_hidden(self, batch_size: int):
        leaves = []
        for shape, axis in zip(self._shapes, self._batch_axes):
            leaves.append(torch.zeros([batch_size if i == axis else d for i, d in enumerate(shape)]))
        return pytree.tree_unflatten(leaves, self._spec)


def load_program(path: Path) -> nn.Module:
    """The ``.pt2`` program at ``path`` as an nn.Module (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
            gm = program.module()
            reference = program.module()
    except Exception as exc:  # noqa: BLE001 - a damaged archive makes torch raise anything
        raise ModelLoadError(
            f"{path} is a damaged torch.export program ({first_line(exc)}); save it again"
        ) from None
    if not isinstance(gm, fx.GraphModule):
        raise ModelLoadError(
            f"{path}: expected program.module() to give an fx GraphModule, got "
            f"{type(gm).__name__}; {WAY_OUT}"
        )
    _drop_guards(gm)
    # program.module() refuses train()/eval(); the rebuilt layers need them (dropout).
    for name in ("train", "eval"):
        vars(gm).pop(name, None)
    refuse_packed(path, gm)
    bare = bare_layer(path, gm)
    if bare is not None:
        return bare
    layers = rewrite(path, gm)
    example = getattr(program, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        if kwargs:
            raise ModelLoadError(
                f"{path} is a torch.export program called with keyword arguments "
                f"({', '.join(kwargs)}); rnnedge passes inputs positionally: export the "
                f"program with positional inputs only, or {WAY_OUT}"
            )
        outputs = _check_rewrite(path, gm, reference, args)
        cell = _bare_cell(gm, layers, args, outputs)
        if cell is not None:
            return cell
        step = _step_state(path, args, outputs, _data_batch_axis(gm, layers))
        if step is not None:
            return ProgramStep(gm, args[-1], step)
    if not layers:
        raise ModelLoadError(
            f"{path} is a torch.export program with no nn.RNN/LSTM/GRU or cell in it and no "
            "step protocol forward(x, state) -> (output, state) (with stored example inputs), "
            f"so there is no state to carry; {WAY_OUT}"
        )
    return gm


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove program.module()'s guard on the example's input sizes (the gate proves others)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            if not node.users:
                gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn") and not any(
            n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes):
        gm.delete_submodule("_guards_fn")
    # Without the guard function the input pre-hook would check the example's sizes.
    gm.validate_inputs = False
    gm.recompile()


def _check_rewrite(path: Path, gm: nn.Module, reference: nn.Module, args) -> list:
    """Run both on the example inputs: the rewrite must not change the program."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = pytree.tree_leaves(reference(*args))
            got_tree = gm(*args)
    except Exception as exc:  # noqa: BLE001 - the program's own failure, in one line
        raise ModelLoadError(
            f"{path}: the program does not run on its own example inputs "
            f"({type(exc).__name__}: {first_line(exc)}); save it again, or {WAY_OUT}"
        ) from None
    got = pytree.tree_leaves(got_tree)
    ok = len(got) == len(want) and all(
        isinstance(a, torch.Tensor) and a.shape == b.shape
        and (not a.is_floating_point() or torch.allclose(a, b, atol=ATOL, rtol=RTOL))
        for a, b in zip(got, want))
    if not ok:
        raise ExportError(
            f"{path}: rebuilding the program's recurrent layers changed its outputs on its "
            f"example inputs (an rnnedge bug: please report it); {WAY_OUT}"
        )
    return got_tree


def _bare_cell(gm: fx.GraphModule, layers: list[str], args, outputs) -> nn.Module | None:
    """The rebuilt cell when the program is exactly ``cell(x, hx)``, checked on its example."""
    if len(layers) != 1:
        return None
    cell = gm.get_submodule(layers[0])
    if not isinstance(cell, CELLS) or len(args) != 2:
        return None
    try:
        with torch.no_grad():
            want = pytree.tree_leaves(cell(*args))
    except Exception:  # noqa: BLE001 - the program is not the bare cell call
        return None
    got = pytree.tree_leaves(outputs)
    if len(got) == len(want) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want)):
        return cell
    return None


def _data_batch_axis(gm: fx.GraphModule, layers: list[str]) -> int | None:
    """The data input's batch axis as the program's first recurrent layer reads it, if known."""
    for name in layers:
        module = gm.get_submodule(name)
        layer = type_of(module)
        if layer is not None:
            return 0 if layer.cell or module.batch_first else 1
    return None


def _step_state(path: Path, args, outputs, batch_axis: int | None = None) -> list[int] | None:
    """Batch axes of the state when forward is (*inputs, state) -> (*outputs, state).

    batch_axis: which axis of the first data input is the batch, when the program's layers
    say so; otherwise both of its first two axes are tried and must not both fit.
    """
    if len(args) < 2 or not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
        return None
    state_in, spec_in = pytree.tree_flatten(args[-1])
    state_out, spec_out = pytree.tree_flatten(outputs[-1])
    if (not state_in or spec_in != spec_out
            or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in state_in)
            or [tuple(t.shape) for t in state_in] != [tuple(t.shape) for t in state_out]):
        return None
    data = [x for x in pytree.tree_leaves(args[:-1]) if isinstance(x, torch.Tensor) and x.dim()]
    candidates = []
    for x in data[:1]:
        axes_of_x = [0, 1] if x.dim() > 1 else [0]
        if batch_axis is not None and batch_axis in axes_of_x:
            axes_of_x = [batch_axis]
        candidates = [int(x.shape[a]) for a in axes_of_x]
    found = []
    for b in candidates:
        axes = []
        for t in state_in:
            hits = [i for i in range(t.dim()) if t.shape[i] == b]
            if len(hits) > 1 and t.dim() == 3 and 1 in hits:
                hits = [1]  # (layers, batch, hidden), as nn.RNN/LSTM/GRU keep it
            if len(hits) != 1:
                break
            axes.append(hits[0])
        else:
            found.append(axes)
    if len(found) == 1 or (found and all(f == found[0] for f in found)):
        return found[0]
    shapes = [tuple(t.shape) for t in state_in]
    raise ModelLoadError(
        f"{path} is a step-protocol program forward(x, state) -> (output, state), but the "
        f"batch axis of its state {shapes} cannot be told from its example inputs "
        f"({[tuple(x.shape) for x in data]}); export the program with a batch size no other "
        f"axis has (e.g. 3), or {WAY_OUT}"
    )
