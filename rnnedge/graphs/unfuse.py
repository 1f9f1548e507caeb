"""Fused ONNX GRU/RNN nodes rewritten as MatMul + Scan, so that int8 tools can reach them.

onnxruntime's dynamic quantizer has an int8 kernel for LSTM (com.microsoft
DynamicQuantizeLSTM) but none for GRU or RNN: it leaves those nodes in float32, so an
int8 export would save nothing. Their weights are reachable once the gate matmuls are
plain MatMul nodes with constant weights, which the quantizer turns into int8 kernels.

Each fused node over time-major X (T, B, I) becomes, per direction d:

- the input projection for all steps at once, outside the recurrence:
  ``XP = X @ W[d]^T + bias`` (T, B, G*H) — one big MatMul, the cheap part to quantize;
- the recurrence as an ONNX ``Scan`` over time, whose body computes ``h @ R[d]^T`` (B, G*H)
  and the gate math for one step. R^T is an initializer *of the body graph*, so the
  quantizer (run with ``EnableSubgraph``) finds and quantizes it there;
- ``sequence_lens`` (when given) becomes a (T, B, 1) bool mask scanned along with XP: past a
  row's length the state is held and the output is zero, as the fused ops define it. The
  same mask serves the reverse direction, which then starts at each row's last valid step.

Scan keeps the time axis dynamic (no unrolling), and graph inputs, outputs and names are
untouched, so the streaming contract is unchanged. The float32 export stays fused: this
rewrite is only used for the int8 variant.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnedge.errors import UnsupportedModelError
from rnnedge.graphs.builder import unique_name

KINDS = ("GRU", "RNN")


class _Names:
    """Unique value/node names for everything the rewrite adds to one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {v for n in graph.node for v in (*n.input, *n.output, n.name)}
        self.used |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}

    def __call__(self, hint: str) -> str:
        return unique_name(self.used, hint)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check(node: onnx.NodeProto, attrs: dict, consts: dict) -> None:
    where = f"{node.op_type} node {node.name!r}"
    if attrs.get("layout", 0) != 0:
        raise UnsupportedModelError(f"{where} uses layout=1; int8 GRU/RNN needs layout 0")
    if "clip" in attrs:
        raise UnsupportedModelError(f"{where} uses clip, which int8 GRU/RNN does not support")
    for k in (1, 2, 3):
        if len(node.input) > k and node.input[k] and node.input[k] not in consts:
            raise UnsupportedModelError(
                f"{where} takes computed weights ({node.input[k]}); int8 needs constant weights"
            )
    acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    if node.op_type == "GRU" and acts and any(a != d for a, d in zip(acts, ["Sigmoid", "Tanh"] * 2)):
        raise UnsupportedModelError(f"{where} uses activations {acts}; int8 GRU needs Sigmoid/Tanh")
    if node.op_type == "RNN" and any(a not in ("Tanh", "Relu") for a in acts):
        raise UnsupportedModelError(f"{where} uses activations {acts}; int8 RNN needs Tanh or Relu")


def _vi(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def _body(kind: str, attrs: dict, d: int, R: np.ndarray, rb: np.ndarray | None,
          masked: bool, hint: str) -> onnx.GraphProto:
    """The Scan body for one direction.

    (h (B, H), xp_t (B, G*H)[, m_t (B, 1) bool]) -> (h' (B, H), y_t (B, H)). ``xp_t`` holds
    the input projection and the biases that fold into it; ``rb`` (G*H,) is a recurrent
    bias that must be added after h @ R^T (GRU's candidate, under the reset gate), or None.
    Every name is prefixed with ``hint``: subgraph names must not collide with the outer
    graph's or another body's.
    """
    H = R.shape[-1]
    p = lambda s: f"{hint}_{s}"  # noqa: E731 - a one-line name helper
    nodes = []
    inits = [numpy_helper.from_array(np.ascontiguousarray(R.T), p("RT"))]  # (H, G*H)

    def op(op_type, inputs, out, n_out=1, **kw):
        outs = [p(out)] if n_out == 1 else [p(f"{out}{k}") for k in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=p(f"{out}_node"), **kw))
        return outs[0] if n_out == 1 else outs

    def const(array, name):
        inits.append(numpy_helper.from_array(np.asarray(array), p(name)))
        return p(name)

    # The state is carried as (1, B, H), one direction of ONNX's (D, B, H), and each step's
    # output is (1, B, H), so Scan stacks it straight into ONNX's Y (T, 1, B, H): no
    # Gather/Unsqueeze around the loop (at one step per call, every node costs).
    h_prev, xp_t, m_t = p("h_prev"), p("xp_t"), p("m_t")
    hr = op("MatMul", [h_prev, p("RT")], "hr")  # (1, B, G*H)
    if rb is not None:
        hr = op("Add", [hr, const(rb.astype(np.float32), "rb")], "hr_b")
    if kind == "RNN":
        acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
        h_new = op(acts[d] if len(acts) > d else "Tanh", [op("Add", [xp_t, hr], "pre")], "h_cand")
    else:
        # ONNX GRU gate order z, r, h. PyTorch's GRU (linear_before_reset=1) applies the
        # reset gate to (h @ R_h^T + Rb_h); with 0, r multiplies h before its matmul.
        # z and r come from one Add and one Sigmoid over all 3H (the third block unused).
        splits = const(np.array([H, H, H], dtype=np.int64), "splits")
        sig = op("Sigmoid", [op("Add", [xp_t, hr], "gates")], "sig")
        z, r, _ = op("Split", [sig, splits], "zr", n_out=3, axis=-1)
        _, _, xh = op("Split", [xp_t, splits], "xs", n_out=3, axis=-1)
        if attrs.get("linear_before_reset", 0):
            _, _, hh = op("Split", [hr, splits], "hs", n_out=3, axis=-1)
            cand = op("Mul", [r, hh], "r_hh")
        else:
            rh = op("Mul", [r, h_prev], "rh")
            cand = op("MatMul", [rh, const(np.ascontiguousarray(R[2 * H:].T), "RhT")], "rhh")
        n = op("Tanh", [op("Add", [xh, cand], "n_pre")], "n")
        # h' = (1 - z) * n + z * h = n + z * (h - n)
        zhn = op("Mul", [z, op("Sub", [h_prev, n], "h_minus_n")], "zhn")
        h_new = op("Add", [n, zhn], "h_cand")
    inputs = [_vi(h_prev, TensorProto.FLOAT, [1, "B", H]),
              _vi(xp_t, TensorProto.FLOAT, ["B", R.shape[0]])]
    if masked:
        # Past a row's length: hold the state, emit zeros (the fused ops' sequence_lens rule).
        inputs.append(_vi(m_t, TensorProto.BOOL, ["B", 1]))
        h_out = op("Where", [m_t, h_new, h_prev], "h_next")
        y_out = op("Where", [m_t, h_new, const(np.zeros((), np.float32), "zero")], "y_t")
    else:
        h_out = h_new
        y_out = op("Identity", [h_new], "y_t")  # a graph output may not be listed twice
    outputs = [_vi(h_out, TensorProto.FLOAT, [1, "B", H]), _vi(y_out, TensorProto.FLOAT, [1, "B", H])]
    return helper.make_graph(nodes, p("step"), inputs, outputs, initializer=inits)


def _rewrite(node: onnx.NodeProto, consts: dict, new: _Names) -> tuple[list, list]:
    """(nodes, initializers) equal to one fused GRU/RNN node."""
    kind = node.op_type
    attrs = _attrs(node)
    _check(node, attrs, consts)
    ins = list(node.input) + [""] * (6 - len(node.input))
    x, w_name, r_name, b_name, lens, h0 = ins[:6]
    W, R = consts[w_name], consts[r_name]  # (D, G*H, I), (D, G*H, H)
    dirs, gh, H = R.shape[0], R.shape[1], R.shape[2]
    B = consts[b_name] if b_name else np.zeros((dirs, 2 * gh), np.float32)
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    hint = new(node.name or kind.lower())
    nodes, inits = [], []

    def op(op_type, inputs, out_hint, n_out=1, **kw):
        outs = [new(f"{hint}_{out_hint}{'' if n_out == 1 else k}") for k in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=new(f"{outs[0]}_node"), **kw))
        return outs[0] if n_out == 1 else outs

    def const(array, out_hint):
        name = new(f"{hint}_{out_hint}")
        inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d
        return name

    mask = None
    if lens:
        # (T, B, 1) bool: step t is valid for row b while t < lens[b].
        shape = op("Shape", [x], "xshape")
        steps = op("Gather", [shape, const(np.array(0, np.int64), "zero_i")], "steps")
        t = op("Range", [const(np.array(0, np.int64), "start"), steps,
                         const(np.array(1, np.int64), "one_i")], "t")
        t2 = op("Unsqueeze", [t, const(np.array([1], np.int64), "ax1")], "t2")  # (T, 1)
        lens64 = op("Cast", [lens], "lens64", to=TensorProto.INT64)
        valid = op("Less", [t2, lens64], "valid")  # (T, B)
        mask = op("Unsqueeze", [valid, const(np.array([2], np.int64), "ax2")], "mask")
    if not h0:
        # Omitted initial_h means zeros (D, B, H).
        shape = op("Shape", [x], "xshape_h")
        batch = op("Slice", [shape, const(np.array([1], np.int64), "b0"),
                             const(np.array([2], np.int64), "b1")], "batch")
        dims = op("Concat", [const(np.array([dirs], np.int64), "dirs"), batch,
                             const(np.array([H], np.int64), "hid")], "h0shape", axis=0)
        h0 = op("ConstantOfShape", [dims], "h0", value=numpy_helper.from_array(np.zeros(1, np.float32)))

    outs = list(node.output) + [""] * (2 - len(node.output))
    ys, hs = [], []
    for d in range(dirs):
        wb, rb = B[d, :gh], B[d, gh:]
        if kind == "GRU":
            # z and r take Wb + Rb outside the loop; the candidate's Rb_h must stay inside
            # (it is multiplied by r) when linear_before_reset=1; with 0, r multiplies h
            # before its matmul and Rb_h folds into the projection like the rest.
            lbr = attrs.get("linear_before_reset", 0)
            folded = wb + np.concatenate([rb[:2 * H], np.zeros(H, np.float32) if lbr else rb[2 * H:]])
            inner = np.concatenate([np.zeros(2 * H, np.float32), rb[2 * H:]]) if lbr else None
        else:
            folded, inner = wb + rb, None
        xp = op("MatMul", [x, const(W[d].T, f"WT{d}")], f"xw{d}")  # (T, B, G*H)
        xp = op("Add", [xp, const(folded.astype(np.float32), f"bias{d}")], f"xp{d}")
        h_d = h0
        if dirs > 1:
            h_d = op("Slice", [h0, const(np.array([d], np.int64), f"d{d}"),
                               const(np.array([d + 1], np.int64), f"d{d}end"),
                               const(np.array([0], np.int64), f"ax0_{d}")], f"h0_{d}")  # (1, B, H)
        reverse = direction == "reverse" or d == 1
        body = _body(kind, attrs, d, R[d], inner, mask is not None, f"{hint}_d{d}")
        scan_in = [h_d, xp] + ([mask] if mask is not None else [])
        n_scan = len(scan_in) - 1
        # One direction: the Scan writes the node's own outputs, Y_h (1, B, H) and
        # Y (T, 1, B, H), with nothing in between.
        names = [outs[1] or new(f"{hint}_h{d}"), outs[0] or new(f"{hint}_y{d}")]
        if dirs > 1:
            names = [new(f"{hint}_h{d}"), new(f"{hint}_y{d}")]
        nodes.append(helper.make_node(
            "Scan", scan_in, names, name=new(f"{hint}_scan{d}"), body=body,
            num_scan_inputs=n_scan, scan_input_directions=[int(reverse)] * n_scan,
            scan_output_directions=[int(reverse)]))
        hs.append(names[0])
        ys.append(names[1])
    if dirs > 1:
        for joined, value, axis in ((outs[0], ys, 1), (outs[1], hs, 0)):
            if joined:
                nodes.append(helper.make_node("Concat", value, [joined], name=new(f"{joined}_cat"),
                                              axis=axis))
    return nodes, inits


def unfuse(model: onnx.ModelProto, kinds=KINDS) -> onnx.ModelProto:
    """A copy of ``model`` with every fused node of ``kinds`` in its main graph rewritten.

    The graph's inputs, outputs and metadata are unchanged. Raises UnsupportedModelError
    for a node this rewrite cannot express (computed weights, clip, layout=1, unusual
    activations).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    new = _Names(graph)
    nodes, extra = [], []
    for node in graph.node:
        if node.op_type in kinds and node.domain in ("", "ai.onnx"):
            more, inits = _rewrite(node, consts, new)
            nodes.extend(more)
            extra.extend(inits)
        else:
            nodes.append(node)
    # Fused weights now unused are dropped so the file does not carry them twice.
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + extra)
    return out


def has_fused(model: onnx.ModelProto, kinds=KINDS) -> bool:
    """Whether the main graph holds a fused node of ``kinds``."""
    return any(n.op_type in kinds for n in model.graph.node)
