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
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.version_converter
import torch
from torch import Tensor, nn

from rnnedge.errors import ExportError, RnnedgeError, UnsupportedModelError, UsageError
from rnnedge.graphs.emit import emit_cell, emit_stack
from rnnedge.recurrent import CELLS, STACKS

IR_VERSION = 10  # what the exporter writes; runtimes lag behind onnx

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
# Translation: emit.py through onnxscript
# ---------------------------------------------------------------------------


class OnnxscriptBuilder:
    """The ``GraphBuilder`` interface emit.py uses, over an onnxscript opset module.

    Used inside a custom translation, where onnxscript records the ops into the graph
    torch.onnx.export builds: values are onnxscript's symbolic tensors, not names.
    """

    def __init__(self, opset: int):
        import onnxscript

        self.opset = max(opset, 18)  # torch.onnx builds at >= 18 and converts down after
        self._op = getattr(onnxscript, f"opset{self.opset}")

    def op(self, op_type: str, inputs, *, n_out: int = 1, hint: str | None = None, **attrs):
        args = [None if isinstance(v, str) and v == "" else v for v in inputs]
        result = getattr(self._op, op_type)(*args, **attrs)
        if n_out == 1:
            return result[0] if isinstance(result, (tuple, list)) else result
        return list(result)[:n_out]

    def const(self, array: np.ndarray, hint: str):
        import onnx_ir

        return self._op.Constant(value=onnx_ir.tensor(np.ascontiguousarray(array), name=hint))

    def ints(self, values, hint: str = "ints"):
        return self.const(np.asarray(values, dtype=np.int64), hint)


def translations(opset: int) -> dict:
    """torch.onnx.export's custom_translation_table for the four rnnedge ops."""

    def stack_h(x, h0, layer):
        y, hn, _ = emit_stack(OnnxscriptBuilder(opset), _layer(layer), x, h0, None)
        return y, hn

    def stack_hc(x, h0, c0, layer):
        return emit_stack(OnnxscriptBuilder(opset), _layer(layer), x, h0, c0)

    def cell_h(x, h0, layer):
        return emit_cell(OnnxscriptBuilder(opset), _layer(layer), x, h0, None)[0]

    def cell_hc(x, h0, c0, layer):
        return emit_cell(OnnxscriptBuilder(opset), _layer(layer), x, h0, c0)

    ops = torch.ops.rnnedge
    return {
        ops.stack_h.default: stack_h,
        ops.stack_hc.default: stack_hc,
        ops.cell_h.default: cell_h,
        ops.cell_hc.default: cell_hc,
    }


# ---------------------------------------------------------------------------
# Patched layers
# ---------------------------------------------------------------------------


def is_supported(module: nn.Module) -> bool:
    """A PyTorch recurrent layer rnnedge translates: exactly its own forward, no override."""
    for base in STACKS + CELLS:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


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
        return isinstance(self.module, (nn.LSTM, nn.LSTMCell))

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

    @contextlib.contextmanager
    def installed(self, *, lift: bool = False, tracing: bool = False, probing: bool = False):
        """Patch every layer's forward (and register it for the custom ops) meanwhile."""
        saved = (self.lift, self.tracing, self.probing)
        self.lift, self.tracing, self.probing = lift, tracing, probing
        patched = []
        try:
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
        ctx, layer, m = self.ctx, self.layer, self.layer.module
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise UnsupportedModelError(
                f"layer {layer.path!r} ({kind_name(m)}) is given a PackedSequence inside "
                "forward(); rnnedge traces padded tensors only: pass the padded batch (or "
                "export the bare layer with mode='sequence', which takes a lengths input)"
            )
        unbatched = input.dim() == (1 if layer.is_cell else 2)
        if ctx.probing:
            rec = layer.record
            rec.calls += 1
            rec.unbatched |= unbatched
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
        if ctx.tracing:
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


# ---------------------------------------------------------------------------
# torch.onnx.export and the graph it gives
# ---------------------------------------------------------------------------

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


def export_onnx(wrapper: nn.Module, args: tuple, dynamic_shapes, input_names, output_names,
                opset: int, what: str) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with rnnedge's translations, cleaned up; ExportError on failure.

    The wrapper's forward takes ``*flat`` tensors. torch.onnx builds at opset >= 18; an
    older opset is reached with onnx's version converter afterwards.
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
        raise ExportError(
            f"torch.onnx.export could not trace {what} ({_first_line(exc)}); make forward() "
            "traceable by torch.export (no Python control flow on tensor values, no "
            "numpy/.item() calls), or write the model as a step-protocol module "
            "forward(x, state) -> (output, state)"
        ) from exc
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
                f"onnx could not convert the graph of {what} to opset {opset} "
                f"({_first_line(exc)}); leave the opset out for the default (18)"
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
