"""Tracing models that contain PyTorch recurrent layers, one fused ONNX node per layer.

Every nn.RNN/LSTM/GRU (and cell) inside a model is *patched* for the duration of an
export: its instance ``forward`` is replaced by a ``LayerCall`` (the module object, its
parameters and attributes stay where they are). While tracing, a ``LayerCall`` calls one
custom op per layer module::

    rnnedge::stack_h (x, h0, int layer) -> (y, hn)        nn.RNN, nn.GRU   (x time-major)
    rnnedge::stack_hc(x, h0, c0, int layer) -> (y, hn, cn) nn.LSTM
    rnnedge::cell_h  (x, h0, int layer) -> hn             nn.RNNCell, nn.GRUCell
    rnnedge::cell_hc (x, h0, c0, int layer) -> (hn, cn)   nn.LSTMCell

``layer`` indexes a registry of the modules being exported. torch.onnx.export translates
each op with ``emit.emit_stack``/``emit.emit_cell`` (the same translation as bare layers)
through ``OnnxscriptBuilder``, so each layer becomes one fused RNN/LSTM/GRU node whose
weights are constants, lifted to initializers afterwards. Outside tracing a ``LayerCall``
runs the layer's own PyTorch forward, so the patched model is also the eager reference.

State lifting (models whose forward takes only the input): the wrapper hands each
layer's initial state to its ``LayerCall`` through a plain ``Slot`` (not a Module) and
collects the final state from it; the layer then ignores any state the model passes.

Modules: this one (the custom ops and the patched layers), ``translations`` (how
torch.onnx translates the ops), ``torchonnx`` (running torch.onnx.export with these
translations, and the graph it gives).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rnnedge.errors import UnsupportedModelError, UsageError
from rnnedge.recurrent import CELLS, has_own_forward, type_of

# Modules being exported, by the int the custom ops carry. Filled per export, then emptied.
_REGISTRY: dict[int, nn.Module] = {}
_ids = itertools.count()


# ---------------------------------------------------------------------------
# Custom ops: eager implementations run the layer's own forward (only used if a
# traced program is ever run eagerly); fake implementations give the shapes.
# ---------------------------------------------------------------------------


def _layer(layer: int) -> nn.Module:
    try:
        return _REGISTRY[layer]
    except KeyError:
        raise RuntimeError(f"rnnedge layer {layer} is not registered (export finished?)") from None


def registered(layer: int) -> nn.Module:
    """The module a custom op's ``layer`` int stands for (``packed``'s ops use it too)."""
    return _layer(layer)


def _run_stack(m: nn.Module, x: Tensor, hx):
    x = x.transpose(0, 1) if m.batch_first else x
    y, hn = type(m).forward(m, x, hx)
    y = y.transpose(0, 1) if m.batch_first else y
    return y.contiguous(), hn


@torch.library.custom_op("rnnedge::stack_h", mutates_args=())
def _stack_h(x: Tensor, h0: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    y, hn = _run_stack(_layer(layer), x, h0)
    return y, hn.clone()


@torch.library.custom_op("rnnedge::stack_hc", mutates_args=())
def _stack_hc(x: Tensor, h0: Tensor, c0: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    y, (hn, cn) = _run_stack(_layer(layer), x, (h0, c0))
    return y, hn.clone(), cn.clone()


@torch.library.custom_op("rnnedge::cell_h", mutates_args=())
def _cell_h(x: Tensor, h0: Tensor, layer: int) -> Tensor:
    m = _layer(layer)
    return type(m).forward(m, x, h0).clone()


@torch.library.custom_op("rnnedge::cell_hc", mutates_args=())
def _cell_hc(x: Tensor, h0: Tensor, c0: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    m = _layer(layer)
    hn, cn = type(m).forward(m, x, (h0, c0))
    return hn.clone(), cn.clone()


def _stack_out_width(m: nn.Module) -> int:
    return (2 if m.bidirectional else 1) * (m.proj_size or m.hidden_size)


@_stack_h.register_fake
def _(x, h0, layer):
    m = _layer(layer)
    return x.new_empty(x.shape[0], x.shape[1], _stack_out_width(m)), h0.new_empty(h0.shape)


@_stack_hc.register_fake
def _(x, h0, c0, layer):
    m = _layer(layer)
    y = x.new_empty(x.shape[0], x.shape[1], _stack_out_width(m))
    return y, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@_cell_h.register_fake
def _(x, h0, layer):
    return h0.new_empty(h0.shape)


@_cell_hc.register_fake
def _(x, h0, c0, layer):
    return h0.new_empty(h0.shape), c0.new_empty(c0.shape)


# ---------------------------------------------------------------------------
# Patched layers
# ---------------------------------------------------------------------------


def is_supported(module: nn.Module) -> bool:
    """A PyTorch recurrent layer rnnedge translates: exactly its own forward, no override."""
    return has_own_forward(module)


def is_recurrent(module: nn.Module) -> bool:
    return isinstance(module, (nn.RNNBase, nn.RNNCellBase))


def kind_name(module: nn.Module) -> str:
    return type(module).__name__


@dataclass
class Slot:
    """One lifted layer's state for the current call (plain object: never traced as a Module)."""

    init: tuple | None = None
    final: tuple | None = None


@dataclass
class Record:
    """What the probe saw a layer do in one forward."""

    calls: int = 0
    unbatched: bool = False
    batches: set = field(default_factory=set)  # the batch sizes its input had
    given_state: bool = False
    nonzero_state: bool = False


@dataclass
class Layer:
    """One recurrent module of the model, as patched."""

    path: str
    module: nn.Module
    layer_id: int
    slot: Slot = field(default_factory=Slot)
    record: Record = field(default_factory=Record)

    @property
    def is_cell(self) -> bool:
        return isinstance(self.module, CELLS)

    @property
    def has_c(self) -> bool:
        return len(type_of(self.module).states) > 1  # LSTMs carry c beside h

    @property
    def bidirectional(self) -> bool:
        return bool(getattr(self.module, "bidirectional", False))

    def state_shapes(self) -> list[tuple]:
        """Lifted state shapes, batch as the string "batch" (h, then c for LSTMs)."""
        m = self.module
        if self.is_cell:
            return [("batch", m.hidden_size)] * (2 if self.has_c else 1)
        n = m.num_layers * (2 if m.bidirectional else 1)
        shapes = [(n, "batch", m.proj_size or m.hidden_size)]
        if self.has_c:
            shapes.append((n, "batch", m.hidden_size))
        return shapes

    def batch_axis(self) -> int:
        return 0 if self.is_cell else 1

    def state_names(self) -> list[tuple[str, str]]:
        pairs = [(f"{self.path}.h0", f"{self.path}.hn")]
        if self.has_c:
            pairs.append((f"{self.path}.c0", f"{self.path}.cn"))
        return pairs


class Context:
    """The patched layers of one export and how they behave right now."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]]):
        self.model = model
        self.layers = [Layer(path, m, next(_ids)) for path, m in layers]
        self.lift = False  # lifted layers take Slot.init and ignore the model's state
        self.tracing = False  # call the custom ops instead of the layers' forward
        self.probing = False  # record what each layer is called with
        self.packed_lengths: list = []  # what probes gave pack_padded_sequence as lengths

    @contextlib.contextmanager
    def installed(self, *, lift: bool = False, tracing: bool = False, probing: bool = False):
        """Patch every layer's forward (and register it for the custom ops) meanwhile."""
        from rnnedge.exporters import fixes, packed  # they build on this module

        saved = (self.lift, self.tracing, self.probing)
        self.lift, self.tracing, self.probing = lift, tracing, probing
        patched = []
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(packed.patched(self))
            if tracing:
                stack.enter_context(fixes.mode())
            for layer in self.layers:
                if "forward" in vars(layer.module):
                    raise UnsupportedModelError(
                        f"layer {layer.path!r} ({kind_name(layer.module)}) has its forward "
                        "replaced on the instance; rnnedge translates PyTorch's own forward "
                        "only: remove the override"
                    )
                _REGISTRY[layer.layer_id] = layer.module
                layer.module.forward = LayerCall(self, layer)
                patched.append(layer)
            yield self
        finally:
            stack.close()
            for layer in patched:
                vars(layer.module).pop("forward", None)
                _REGISTRY.pop(layer.layer_id, None)
            self.lift, self.tracing, self.probing = saved

    def begin(self, states) -> None:
        """Hand the lifted initial states (flat, in ``state_names`` order) to the slots."""
        it = iter(states)
        for layer in self.layers:
            layer.slot = Slot(init=tuple(next(it) for _ in layer.state_shapes()))

    def end(self) -> list:
        """The lifted final states, flat; every layer must have run once."""
        finals = []
        for layer in self.layers:
            if layer.slot.final is None:
                raise UnsupportedModelError(
                    f"layer {layer.path!r} ({kind_name(layer.module)}) was not called by "
                    "forward(), so its state cannot be carried; remove it or call it"
                )
            finals.extend(layer.slot.final)
            layer.slot = Slot()
        return finals


class LayerCall:
    """The patched ``forward`` of one recurrent module."""

    def __init__(self, ctx: Context, layer: Layer):
        self.ctx = ctx
        self.layer = layer

    def __call__(self, input, hx=None):
        from rnnedge.exporters import packed  # it builds on this module

        ctx, layer, m = self.ctx, self.layer, self.layer.module
        # A PackedSequence eagerly; while tracing, what the patched pack_padded_sequence gives.
        is_packed = isinstance(input, (nn.utils.rnn.PackedSequence, packed.Padded))
        unbatched = not is_packed and input.dim() == (1 if layer.is_cell else 2)
        if ctx.probing:
            rec = layer.record
            rec.calls += 1
            rec.unbatched |= unbatched
            if isinstance(input, nn.utils.rnn.PackedSequence):
                rec.batches.add(int(input.batch_sizes[0]))
            elif not unbatched:
                rec.batches.add(int(input.shape[1 if not layer.is_cell and not m.batch_first else 0]))
            if hx is not None:
                rec.given_state = True
                leaves = hx if isinstance(hx, (tuple, list)) else (hx,)
                rec.nonzero_state |= any(bool(torch.any(t != 0)) for t in leaves)
        if unbatched:
            raise UsageError(
                f"layer {layer.path!r} ({kind_name(m)}) is called with an unbatched input "
                f"of shape {tuple(input.shape)}; give the input a batch axis (and a time axis "
                "for nn.RNN/LSTM/GRU), e.g. --input-shape batch,time,F"
            )
        if ctx.lift:
            init = layer.slot.init
            hx = (init[0], init[1]) if layer.has_c else init[0]
        if ctx.tracing and isinstance(input, packed.Padded):
            out = packed.traced_call(layer, input, hx)
        elif ctx.tracing:
            out = self._traced(input, hx)
        else:
            out = type(m).forward(m, input, hx)
        if ctx.lift:
            state = out if layer.is_cell else out[1]
            layer.slot.final = tuple(state) if layer.has_c else (state,)
        return out

    def _traced(self, x: Tensor, hx):
        layer, m = self.layer, self.layer.module
        ops = torch.ops.rnnedge
        if layer.is_cell:
            if hx is None:
                z = x.new_zeros(x.shape[0], m.hidden_size)
                hx = (z, z) if layer.has_c else z
            if layer.has_c:
                return tuple(ops.cell_hc(x, hx[0], hx[1], layer.layer_id))
            return ops.cell_h(x, hx, layer.layer_id)
        xt = x.transpose(0, 1) if m.batch_first else x
        if hx is None:
            n = m.num_layers * (2 if m.bidirectional else 1)
            h = xt.new_zeros(n, xt.shape[1], m.proj_size or m.hidden_size)
            hx = (h, xt.new_zeros(n, xt.shape[1], m.hidden_size)) if layer.has_c else h
        if layer.has_c:
            y, hn, cn = ops.stack_hc(xt, hx[0], hx[1], layer.layer_id)
            state = (hn, cn)
        else:
            y, state = ops.stack_h(xt, hx, layer.layer_id)
        return (y.transpose(0, 1) if m.batch_first else y), state


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each recurrent layer; refuses recurrent modules it cannot translate."""
    found = []
    for path, m in model.named_modules():
        if not is_recurrent(m):
            continue
        if not is_supported(m):
            where = f"layer {path!r}" if path else "the model"
            raise UnsupportedModelError(
                f"{where} is a {type(m).__module__}.{type(m).__qualname__}, a recurrent "
                "module rnnedge cannot translate (it exports nn.RNN/LSTM/GRU and their cells "
                "with PyTorch's own forward); use one of those, or write the layer as a "
                "step-protocol module forward(x, state) -> (y, state)"
            )
        if m is not model:
            found.append((path, m))
    return found
