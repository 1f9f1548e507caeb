"""Rewriting a ``torch.export`` program's recurrent ATen calls back into nn modules.

In ``program.module()`` every PyTorch recurrent layer is one ATen call (the ops of
``rnnedge.recurrent.TYPES``). Each such call becomes a ``call_module`` of the rebuilt
``nn.LSTM``/``GRU``/``RNN`` (or cell): hyper-parameters read from the call's arguments and
the weight shapes, weights copied from the get_attr nodes the call reads. ``aten.embedding``
becomes an ``nn.Embedding`` so that token inputs are sampled over its vocabulary. An
initial state the program builds with ``aten.zeros`` (what nn.LSTM does when given none)
is dropped, so the rebuilt layer makes its own zeros at whatever batch size it sees. The
rebuilt layer takes the place of the submodule that held its weights (so
``encoder.lstm`` keeps its path, and its lifted state is ``encoder.lstm.h0``).
"""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rnnedge.errors import ModelLoadError
from rnnedge.recurrent import ATEN_OPS, PACKED_OPS, LayerType, rebuild

aten = torch.ops.aten
WAY_OUT = "save model.state_dict() and pass --arch module:Class"
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}


def refuse_packed(path: Path, gm: fx.GraphModule) -> None:
    """A recurrent layer run on a PackedSequence is refused: rnnedge traces padded tensors."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in PACKED_OPS:
            raise ModelLoadError(
                f"{path}: the program runs a recurrent layer on a PackedSequence "
                f"({node.target}); rnnedge traces padded tensors only: export the model "
                f"with padded input, or {WAY_OUT}"
            )


def recurrent_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The program's calls of recurrent ATen ops, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATEN_OPS]


def _layer(node: fx.Node) -> LayerType:
    return ATEN_OPS[node.target].layer


def _what(node: fx.Node) -> str:
    return f"{node.name} ({node.target})"


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _stored(path: Path, gm: fx.GraphModule, nodes, what: str) -> list[torch.Tensor]:
    """The tensors the get_attr ``nodes`` read; refused when one is computed in forward."""
    out = []
    for n in nodes:
        if not (isinstance(n, fx.Node) and n.op == "get_attr"):
            found = n.op if isinstance(n, fx.Node) else type(n).__name__
            raise ModelLoadError(
                f"{path}: expected the weights of {what} to be stored tensors of the "
                f"program, found one computed in forward ({found}); {WAY_OUT}"
            )
        t = _fetch(gm, n.target)
        if not isinstance(t, torch.Tensor):
            raise ModelLoadError(
                f"{path}: weight {n.target} of {what} is a {type(t).__name__}, "
                f"expected a tensor; {WAY_OUT}"
            )
        out.append(t.detach())
    return out


def _stack_hyper(path: Path, gm: fx.GraphModule, node: fx.Node):
    """(weight nodes, weight tensors, hyper-parameters) of a stack's ATen call.

    The call's args: (input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first); params per layer and direction: w_ih (G*H, I),
    w_hh (G*H, P or H), [b_ih, b_hh], [w_hr (P, H)].
    """
    layer, what = _layer(node), _what(node)
    (_, _, params, has_biases, num_layers, dropout, train, bidirectional,
     batch_first) = node.args[:9]
    dirs = 2 if bidirectional else 1
    if not params or len(params) % (num_layers * dirs):
        raise ModelLoadError(
            f"{path}: {what} has {len(params)} weights for {num_layers} layer(s) x "
            f"{dirs} direction(s); expected a whole number per layer; {WAY_OUT}"
        )
    per = len(params) // (num_layers * dirs)
    base = 4 if has_biases else 2
    projects = "proj_size" in layer.hyper
    if per != base and not (projects and per == base + 1):
        raise ModelLoadError(
            f"{path}: {what} has {per} weights per layer and direction; expected "
            f"{base}{' or ' + str(base + 1) + ' (proj_size)' if projects else ''}; {WAY_OUT}"
        )
    tensors = _stored(path, gm, params, what)
    w_ih = tensors[0]
    hyper = {
        "input_size": int(w_ih.shape[1]),
        "hidden_size": int(w_ih.shape[0]) // layer.gates,
        "num_layers": int(num_layers), "bias": bool(has_biases),
        "batch_first": bool(batch_first), "dropout": float(dropout) if num_layers > 1 else 0.0,
        "bidirectional": bool(bidirectional),
    }
    if per == base + 1:
        hyper["proj_size"] = int(tensors[per - 1].shape[0])
    if train and hyper["dropout"]:
        raise ModelLoadError(
            f"{path}: {what} was exported in training mode with dropout "
            f"{hyper['dropout']}; export the program from model.eval()"
        )
    return list(params), tensors, hyper


def _cell_hyper(path: Path, gm: fx.GraphModule, node: fx.Node):
    """(weight nodes, weight tensors, hyper-parameters) of a cell's ATen call.

    The call's args: (input, hx, w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh).
    """
    what = _what(node)
    params = [a for a in node.args[2:6] if a is not None]
    if len(params) not in (2, 4):
        raise ModelLoadError(f"{path}: {what} has {len(params)} weights, expected 2 or 4; {WAY_OUT}")
    tensors = _stored(path, gm, params, what)
    hyper = {"input_size": int(tensors[0].shape[1]),
             "hidden_size": int(tensors[0].shape[0]) // _layer(node).gates,
             "bias": len(params) == 4}
    return params, tensors, hyper


def build_layer(path: Path, gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, list[fx.Node]]:
    """The module a recurrent ATen call computes, and the get_attr nodes of its weights."""
    read = _cell_hyper if _layer(node).cell else _stack_hyper
    params, tensors, hyper = read(path, gm, node)
    # program.module() is in training mode; rebuild gives eval mode: dropout off.
    module = rebuild(node.target, hyper, tensors, name=_what(node), where=str(path),
                     advice=WAY_OUT)
    return module, params


def place(gm: fx.GraphModule, module: nn.Module, params: list[fx.Node], fallback: str) -> str:
    """Put ``module`` where its weights were held, when that submodule held only them."""
    targets = [p.target for p in params]
    prefix = {t.rpartition(".")[0] for t in targets}
    if len(prefix) == 1 and (path := prefix.pop()):
        try:
            holder = gm.get_submodule(path)
        except AttributeError:
            holder = None
        own = {n for n, _ in holder.named_parameters()} | {n for n, _ in holder.named_buffers()} \
            if holder is not None else set()
        names = {t.rpartition(".")[2] for t in targets}
        if (holder is not None and type(holder) is nn.Module and own == names
                and not list(holder.children())):
            parent, _, leaf = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
            return path
    name, k = fallback, 0
    while hasattr(gm, name):
        k += 1
        name = f"{fallback}_{k}"
    gm.add_submodule(name, module)
    return name


def _is_zeros(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ZEROS


def initial_state(node: fx.Node):
    """The state argument for the rebuilt layer, or None where the program made zeros.

    hx is a list (h, c) for two states, one tensor node otherwise.
    """
    hx = node.args[1]
    if len(_layer(node).states) > 1:
        return None if all(_is_zeros(h) for h in hx) else tuple(hx)
    return None if _is_zeros(hx) else hx


def bare_layer(path: Path, gm: fx.GraphModule) -> nn.Module | None:
    """The rebuilt layer when the program is exactly one nn.RNN/LSTM/GRU and its outputs."""
    nodes = recurrent_nodes(gm)
    if len(nodes) != 1 or _layer(nodes[0]).cell:
        return None
    rnn = nodes[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    items = {}
    for user in rnn.users:
        if user.target is not operator.getitem:
            return None
        items[user.args[1]] = user
    want = [items.get(i) for i in range(1 + len(_layer(rnn).states))]  # output, *states
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if None in want or pytree.tree_leaves(out.args) != want:
        return None
    allowed = {rnn, out, *want, *placeholders}
    for n in gm.graph.nodes:
        if n in allowed or n.op == "get_attr" or _is_zeros(n):
            continue
        if n.op == "call_function" and n.target in (aten.sym_size.int,):
            continue
        return None
    if rnn.args[0] is not placeholders[0] or initial_state(rnn) is not None:
        return None
    module, _ = build_layer(path, gm, rnn)
    return module


def _regroup_states(path: Path, graph: fx.Graph, node: fx.Node, call: fx.Node) -> None:
    """aten.lstm gives (output, h, c) where nn.LSTM gives (output, (h, c)): re-index users."""
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise ModelLoadError(
                f"{path}: expected the result of {node.name} to be indexed, "
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


def rewrite(path: Path, gm: fx.GraphModule) -> list[str]:
    """Rewrite every recurrent ATen call and embedding of ``gm`` in place; the rebuilt
    layers' submodule paths, in graph order."""
    graph = gm.graph
    layers = []
    for node in recurrent_nodes(gm):
        layer = _layer(node)
        module, params = build_layer(path, gm, node)
        target = place(gm, module, params, layer.name.lower())
        layers.append(target)
        hx = initial_state(node)
        with graph.inserting_before(node):
            args = (node.args[0],) if hx is None else (node.args[0], hx)
            call = graph.call_module(target, args)
        if not layer.cell and len(layer.states) > 1:
            _regroup_states(path, graph, node, call)
        else:
            # GRU/RNN give (output, h_n), LSTMCell (h, c), GRU/RNN cells h: as the ATen ops.
            node.replace_all_uses_with(call)
        call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        graph.erase_node(node)
    _embeddings(gm)
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return layers


def _embeddings(gm: fx.GraphModule) -> None:
    """aten.embedding on a stored table -> nn.Embedding (token inputs sampled over its vocabulary)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is aten.embedding.default):
            continue
        weight = node.args[0]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        w = _fetch(gm, weight.target)
        pad = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
        module = nn.Embedding(int(w.shape[0]), int(w.shape[1]),
                              padding_idx=None if pad is None or pad < 0 else int(pad))
        with torch.no_grad():
            module.weight.copy_(w.detach())
        target = place(gm, module, [weight], "embedding")
        with graph.inserting_before(node):
            call = graph.call_module(target, (node.args[1],))
        node.replace_all_uses_with(call)
        call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        graph.erase_node(node)
