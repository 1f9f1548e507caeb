"""Translate PyTorch's recurrent layers into fused ONNX RNN/LSTM/GRU nodes, one per layer.

These functions only add nodes to a ``GraphBuilder``; they never unroll time and never
emit Loop/If, so the time and batch axes stay dynamic by construction. They use only
``g.op``, ``g.const`` and ``g.ints`` and test optional values with ``is None``, so any
object with that interface works as ``g`` (``exporters.translations.OnnxscriptBuilder`` emits through
onnxscript inside torch.onnx.export).
"""

from __future__ import annotations

from torch import nn

from rnnedge.graphs.builder import GraphBuilder
from rnnedge.recurrent import kind_of, layer_weights


def _fused_node(g, kind, module, lw, x, h0, c0, seq_lens, hint):
    """One ONNX RNN/LSTM/GRU node over time-major ``x`` (T, B, I).

    h0/c0: (D, B, H) raw (unprojected) states. Returns (Y (T, D, B, H), Y_h, Y_c or None).
    """
    dirs = lw.W.shape[0]
    attrs = {"hidden_size": int(lw.R.shape[-1])}
    if dirs == 2:
        attrs["direction"] = "bidirectional"
    if kind == "GRU":
        attrs["linear_before_reset"] = 1  # PyTorch applies r after the recurrent matmul
    if kind == "RNN":
        act = "Relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "Tanh"
        attrs["activations"] = [act] * dirs
    inputs = [
        x,
        g.const(lw.W, f"{hint}_W"),
        g.const(lw.R, f"{hint}_R"),
        "" if lw.B is None else g.const(lw.B, f"{hint}_B"),
        "" if seq_lens is None else seq_lens,
        h0,
    ]
    if kind == "LSTM":
        inputs.append(c0)
    n_out = 3 if kind == "LSTM" else 2
    outs = g.op(kind, inputs, n_out=n_out, hint=hint, **attrs)
    return outs[0], outs[1], (outs[2] if kind == "LSTM" else None)


def emit_stack(
    g: GraphBuilder,
    module: nn.RNNBase,
    x: str,
    h0: str,
    c0: str | None,
    seq_lens: str | None = None,
):
    """nn.RNN/LSTM/GRU over time-major ``x`` (T, B, I).

    h0: (L*D, B, P or H); c0: (L*D, B, H) for LSTM. seq_lens: int32 (B,) or None.
    Returns (y (T, B, D*Hout), hn (L*D, B, Hout), cn (L*D, B, H) or None).
    """
    kind = kind_of(module)
    dirs = 2 if module.bidirectional else 1
    hs, cs = [], []
    for layer in range(module.num_layers):
        lw = layer_weights(module, layer)
        hint = f"{kind.lower()}{layer}"
        h_l, c_l = h0, c0
        if module.num_layers > 1:
            bounds = (g.ints([layer * dirs]), g.ints([(layer + 1) * dirs]), g.ints([0]))
            h_l = g.op("Slice", [h0, *bounds], hint=f"{hint}_h0")
            c_l = g.op("Slice", [c0, *bounds], hint=f"{hint}_c0") if c0 is not None else None
        if lw.unproj is not None:
            h_l = g.op("MatMul", [h_l, g.const(lw.unproj, f"{hint}_unproj")], hint=f"{hint}_h0raw")
        y, h_n, c_n = _fused_node(g, kind, module, lw, x, h_l, c_l, seq_lens, hint)
        if lw.proj is not None:
            proj = g.const(lw.proj, f"{hint}_proj")
            y = g.op("MatMul", [y, proj], hint=f"{hint}_yproj")  # (T, D, B, P)
            h_n = g.op("MatMul", [h_n, proj], hint=f"{hint}_hproj")
        # (T, D, B, Hout) -> (T, B, D*Hout): the next layer's input and the stack's output.
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3], hint=f"{hint}_yt")
        x = g.op("Reshape", [y, g.ints([0, 0, -1])], hint=f"{hint}_y")
        hs.append(h_n)
        cs.append(c_n)
    hn = g.op("Concat", hs, axis=0, hint="hn_all") if len(hs) > 1 else hs[0]
    cn = None
    if c0 is not None:
        cn = g.op("Concat", cs, axis=0, hint="cn_all") if len(cs) > 1 else cs[0]
    return x, hn, cn


def emit_cell(g: GraphBuilder, module: nn.Module, x: str, h0: str, c0: str | None):
    """nn.RNNCell/LSTMCell/GRUCell as a one-step fused node.

    x: (B, I); h0, c0: (B, H). Returns (hn (B, H), cn (B, H) or None).
    """
    kind = kind_of(module)
    lw = layer_weights(module)
    axis0 = g.ints([0])
    x3 = g.op("Unsqueeze", [x, axis0], hint="x_step")
    h3 = g.op("Unsqueeze", [h0, axis0], hint="h_step")
    c3 = g.op("Unsqueeze", [c0, axis0], hint="c_step") if c0 is not None else None
    _, h_n, c_n = _fused_node(g, kind, module, lw, x3, h3, c3, None, "cell")
    hn = g.op("Squeeze", [h_n, axis0], hint="h_next")
    cn = g.op("Squeeze", [c_n, axis0], hint="c_next") if c0 is not None else None
    return hn, cn
