"""Loading ``torch.export`` programs (``.pt2``) as ordinary modules rnnedge can export.

``program.module()`` is an fx ``GraphModule`` in which every PyTorch recurrent layer has
become one ATen call: ``aten.lstm/gru/rnn_tanh/rnn_relu.input`` for nn.LSTM/GRU/RNN (args:
input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
and ``aten.lstm_cell/gru_cell/rnn_tanh_cell/rnn_relu_cell`` for the cells. Each such call
is rewritten with torch.fx into a ``call_module`` of a rebuilt ``nn.LSTM``/``GRU``/``RNN``
(or cell), hyper-parameters read from the arguments and the weight shapes, weights copied
from the get_attr nodes the call reads; ``aten.embedding`` becomes an ``nn.Embedding`` so
that token inputs are sampled over its vocabulary. An initial state the program builds
with ``aten.zeros`` (what nn.LSTM does when given none) is dropped, so the rebuilt layer
makes its own zeros at whatever batch size it sees. The rebuilt layer takes the place of
the submodule that held its weights (so ``encoder.lstm`` keeps its path, and its lifted
state is ``encoder.lstm.h0``).

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

import operator
import warnings
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rnnedge.errors import ExportError, ModelLoadError, first_line

aten = torch.ops.aten
WAY_OUT = "save model.state_dict() and pass --arch module:Class"

# ATen recurrent ops -> (module class, gates per hidden unit, nonlinearity)
_STACK_OPS = {
    aten.lstm.input: (nn.LSTM, 4, None),
    aten.gru.input: (nn.GRU, 3, None),
    aten.rnn_tanh.input: (nn.RNN, 1, "tanh"),
    aten.rnn_relu.input: (nn.RNN, 1, "relu"),
}
_CELL_OPS = {
    aten.lstm_cell.default: (nn.LSTMCell, 4, None),
    aten.gru_cell.default: (nn.GRUCell, 3, None),
    aten.rnn_tanh_cell.default: (nn.RNNCell, 1, "tanh"),
    aten.rnn_relu_cell.default: (nn.RNNCell, 1, "relu"),
}
# Packed-sequence overloads: a PackedSequence inside forward.
_PACKED = {aten.lstm.data, aten.gru.data, aten.rnn_tanh.data, aten.rnn_relu.data}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
# Self-check of the rewrite on the example inputs (same ATen kernels: tight).
ATOL, RTOL = 1e-5, 1e-4


class ProgramStep(nn.Module):
    """A step-protocol program ``forward(*inputs, state) -> (*outputs, state)`` with an init."""

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
    rewriter = _Rewriter(path, gm)
    bare = rewriter.bare_layer()
    if bare is not None:
        return bare
    rewriter.rewrite()
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
        cell = _bare_cell(gm, rewriter.layers, args, outputs)
        if cell is not None:
            return cell
        step = _step_state(path, args, outputs, _data_batch_axis(gm, rewriter.layers))
        if step is not None:
            return ProgramStep(gm, args[-1], step)
    if not rewriter.layers:
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


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Rewriter:
    def __init__(self, path: Path, gm: fx.GraphModule):
        self.path = path
        self.gm = gm
        self.layers: list[str] = []  # paths of the rebuilt layers
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _PACKED:
                raise ModelLoadError(
                    f"{path}: the program runs a recurrent layer on a PackedSequence "
                    f"({node.target}); rnnedge traces padded tensors only: export the model "
                    f"with padded input, or {WAY_OUT}"
                )

    # -- weights --------------------------------------------------------------------

    def _tensors(self, nodes, what: str) -> list[torch.Tensor]:
        out = []
        for n in nodes:
            if not (isinstance(n, fx.Node) and n.op == "get_attr"):
                found = n.op if isinstance(n, fx.Node) else type(n).__name__
                raise ModelLoadError(
                    f"{self.path}: expected the weights of {what} to be stored tensors of the "
                    f"program, found one computed in forward ({found}); {WAY_OUT}"
                )
            t = _fetch(self.gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise ModelLoadError(
                    f"{self.path}: weight {n.target} of {what} is a {type(t).__name__}, "
                    f"expected a tensor; {WAY_OUT}"
                )
            out.append(t.detach())
        return out

    @staticmethod
    def _load(module: nn.Module, names: list[str], tensors: list[torch.Tensor], what: str,
              path: Path) -> None:
        own = dict(module.named_parameters())
        if len(names) != len(tensors) or any(own[n].shape != t.shape for n, t in zip(names, tensors)):
            got = [tuple(t.shape) for t in tensors]
            want = [tuple(own[n].shape) for n in names]
            raise ModelLoadError(
                f"{path}: the weights of {what} do not fit its hyper-parameters (found "
                f"{got[:4]}..., expected {want[:4]}...); {WAY_OUT}"
            )
        with torch.no_grad():
            for n, t in zip(names, tensors):
                own[n].copy_(t.to(torch.float32) if t.is_floating_point() else t)

    def _build_stack(self, node: fx.Node) -> tuple[nn.Module, list[fx.Node]]:
        cls, gates, nonlin = _STACK_OPS[node.target]
        what = f"{node.name} ({node.target})"
        (_, _, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first) = node.args[:9]
        dirs = 2 if bidirectional else 1
        if not params or len(params) % (num_layers * dirs):
            raise ModelLoadError(
                f"{self.path}: {what} has {len(params)} weights for {num_layers} layer(s) x "
                f"{dirs} direction(s); expected a whole number per layer; {WAY_OUT}"
            )
        per = len(params) // (num_layers * dirs)
        base = 4 if has_biases else 2
        if cls is not nn.LSTM and per != base or cls is nn.LSTM and per not in (base, base + 1):
            raise ModelLoadError(
                f"{self.path}: {what} has {per} weights per layer and direction; expected "
                f"{base}{' or ' + str(base + 1) + ' (proj_size)' if cls is nn.LSTM else ''}; {WAY_OUT}"
            )
        tensors = self._tensors(params, what)
        w_ih = tensors[0]
        proj = per == base + 1
        config = {
            "input_size": int(w_ih.shape[1]),
            "hidden_size": int(w_ih.shape[0]) // gates,
            "num_layers": int(num_layers), "bias": bool(has_biases),
            "batch_first": bool(batch_first), "dropout": float(dropout) if num_layers > 1 else 0.0,
            "bidirectional": bool(bidirectional),
        }
        if proj:
            config["proj_size"] = int(tensors[per - 1].shape[0])
        if nonlin:
            config["nonlinearity"] = nonlin
        if train and config["dropout"]:
            raise ModelLoadError(
                f"{self.path}: {what} was exported in training mode with dropout "
                f"{config['dropout']}; export the program from model.eval()"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropout with one layer etc.
            module = cls(**config).eval()  # program.module() is in training mode: dropout off
        self._load(module, list(module._flat_weights_names), tensors, what, self.path)
        return module, list(params)

    def _build_cell(self, node: fx.Node) -> tuple[nn.Module, list[fx.Node]]:
        cls, gates, nonlin = _CELL_OPS[node.target]
        what = f"{node.name} ({node.target})"
        params = [a for a in node.args[2:6] if a is not None]
        if len(params) not in (2, 4):
            raise ModelLoadError(f"{self.path}: {what} has {len(params)} weights, expected 2 or 4; {WAY_OUT}")
        tensors = self._tensors(params, what)
        config = {"input_size": int(tensors[0].shape[1]),
                  "hidden_size": int(tensors[0].shape[0]) // gates, "bias": len(params) == 4}
        if nonlin:
            config["nonlinearity"] = nonlin
        module = cls(**config).eval()
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"][: len(params)]
        self._load(module, names, tensors, what, self.path)
        return module, params

    # -- placement --------------------------------------------------------------------

    def _place(self, module: nn.Module, params: list[fx.Node], fallback: str) -> str:
        """Put ``module`` where its weights were held, when that submodule held only them."""
        targets = [p.target for p in params]
        prefix = {t.rpartition(".")[0] for t in targets}
        if len(prefix) == 1 and (path := prefix.pop()):
            try:
                holder = self.gm.get_submodule(path)
            except AttributeError:
                holder = None
            own = {n for n, _ in holder.named_parameters()} | {n for n, _ in holder.named_buffers()} \
                if holder is not None else set()
            names = {t.rpartition(".")[2] for t in targets}
            if (holder is not None and type(holder) is nn.Module and own == names
                    and not list(holder.children())):
                parent, _, leaf = path.rpartition(".")
                setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, module)
                return path
        name, k = fallback, 0
        while hasattr(self.gm, name):
            k += 1
            name = f"{fallback}_{k}"
        self.gm.add_submodule(name, module)
        return name

    # -- the rewrite ------------------------------------------------------------------

    def _recurrent_nodes(self):
        return [n for n in self.gm.graph.nodes if n.op == "call_function"
                and (n.target in _STACK_OPS or n.target in _CELL_OPS)]

    @staticmethod
    def _is_zeros(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ZEROS

    def _hx(self, node: fx.Node, lstm: bool):
        """The state argument for the rebuilt layer, or None where the program made zeros."""
        hx = node.args[1]
        if lstm:
            hx = list(hx)
            if all(self._is_zeros(h) for h in hx):
                return None
            return tuple(hx)
        return None if self._is_zeros(hx) else hx

    def bare_layer(self) -> nn.Module | None:
        """The rebuilt layer when the program is exactly one nn.RNN/LSTM/GRU and its outputs."""
        nodes = self._recurrent_nodes()
        if len(nodes) != 1 or nodes[0].target not in _STACK_OPS:
            return None
        rnn = nodes[0]
        lstm = rnn.target is aten.lstm.input
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        items = {}
        for user in rnn.users:
            if user.target is not operator.getitem:
                return None
            items[user.args[1]] = user
        want = [items.get(i) for i in range(3 if lstm else 2)]
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        if None in want or pytree.tree_leaves(out.args) != want:
            return None
        allowed = {rnn, out, *want, *placeholders}
        for n in self.gm.graph.nodes:
            if n in allowed or n.op == "get_attr" or self._is_zeros(n):
                continue
            if n.op == "call_function" and n.target in (aten.sym_size.int,):
                continue
            return None
        if rnn.args[0] is not placeholders[0] or self._hx(rnn, lstm) is not None:
            return None
        module, _ = self._build_stack(rnn)
        return module

    def rewrite(self) -> None:
        graph = self.gm.graph
        for node in self._recurrent_nodes():
            stack = node.target in _STACK_OPS
            cls = (_STACK_OPS if stack else _CELL_OPS)[node.target][0]
            module, params = self._build_stack(node) if stack else self._build_cell(node)
            lstm = cls is nn.LSTM
            target = self._place(module, params, cls.__name__.lower())
            self.layers.append(target)
            if stack:
                hx = self._hx(node, lstm)
            else:
                hx = node.args[1]
                if cls is nn.LSTMCell:
                    hx = None if all(self._is_zeros(h) for h in hx) else tuple(hx)
                elif self._is_zeros(hx):
                    hx = None
            with graph.inserting_before(node):
                args = (node.args[0],) if hx is None else (node.args[0], hx)
                call = graph.call_module(target, args)
            if stack and lstm:
                for user in list(node.users):
                    if user.target is not operator.getitem:
                        raise ModelLoadError(
                            f"{self.path}: expected the result of {node.name} to be indexed, "
                            f"found {user.op} {user.target}; {WAY_OUT}"
                        )
                    index = user.args[1]
                    if index == 0:
                        user.replace_input_with(node, call)
                        continue
                    with graph.inserting_before(user):
                        state = graph.call_function(operator.getitem, (call, 1))
                        new = graph.call_function(operator.getitem, (state, index - 1))
                    user.replace_all_uses_with(new)
                    new.meta.update(user.meta)
                    graph.erase_node(user)
            else:
                # GRU/RNN give (output, h_n), LSTMCell (h, c), GRU/RNN cells h: as the ATen ops.
                node.replace_all_uses_with(call)
            call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            graph.erase_node(node)
        self._embeddings()
        graph.eliminate_dead_code()
        graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    def _embeddings(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if not (node.op == "call_function" and node.target is aten.embedding.default):
                continue
            weight = node.args[0]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            w = _fetch(self.gm, weight.target)
            pad = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
            module = nn.Embedding(int(w.shape[0]), int(w.shape[1]),
                                  padding_idx=None if pad is None or pad < 0 else int(pad))
            with torch.no_grad():
                module.weight.copy_(w.detach())
            target = self._place(module, [weight], "embedding")
            with graph.inserting_before(node):
                call = graph.call_module(target, (node.args[1],))
            node.replace_all_uses_with(call)
            call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            graph.erase_node(node)


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
    if not isinstance(cell, (nn.RNNCell, nn.GRUCell, nn.LSTMCell)) or len(args) != 2:
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
        layer = gm.get_submodule(name)
        if isinstance(layer, (nn.RNN, nn.LSTM, nn.GRU)):
            return 0 if layer.batch_first else 1
        if isinstance(layer, (nn.RNNCell, nn.GRUCell, nn.LSTMCell)):
            return 0
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
