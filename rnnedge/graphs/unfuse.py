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
import onnx_ir as ir

from rnnedge.errors import UnsupportedModelError
from rnnedge.graphs.builder import Writer
from rnnedge.graphs.names import Names
from rnnedge.graphs.passes import run

KINDS = ("GRU", "RNN")


def _fused(graph: ir.Graph, kinds) -> list[ir.Node]:
    """The fused nodes of ``kinds`` in the main graph (not inside subgraphs)."""
    return [n for n in graph if n.op_type in kinds and n.domain in ("", "ai.onnx")]


def _activations(node: ir.Node) -> list[str]:
    return list(node.attributes.get_strings("activations", []))


def _check(node: ir.Node) -> None:
    """Refuse a fused node this rewrite cannot express, with what to do about it."""
    where = f"{node.op_type} node {node.name!r}"
    if node.attributes.get_int("layout", 0) != 0:
        raise UnsupportedModelError(f"{where} uses layout=1; int8 GRU/RNN needs layout 0")
    if "clip" in node.attributes:
        raise UnsupportedModelError(f"{where} uses clip, which int8 GRU/RNN does not support")
    for value in node.inputs[1:4]:
        if value is not None and value.const_value is None:
            raise UnsupportedModelError(
                f"{where} takes computed weights ({value.name}); int8 needs constant weights"
            )
    acts = _activations(node)
    if node.op_type == "GRU" and acts and any(a != d for a, d in zip(acts, ["Sigmoid", "Tanh"] * 2)):
        raise UnsupportedModelError(f"{where} uses activations {acts}; int8 GRU needs Sigmoid/Tanh")
    if node.op_type == "RNN" and any(a not in ("Tanh", "Relu") for a in acts):
        raise UnsupportedModelError(f"{where} uses activations {acts}; int8 RNN needs Tanh or Relu")


def _body(kind: str, node: ir.Node, d: int, R: np.ndarray, rb: np.ndarray | None,
          masked: bool, names: Names, hint: str) -> ir.Graph:
    """The Scan body for one direction.

    (h (1, B, H), xp_t (B, G*H)[, m_t (B, 1) bool]) -> (h' (1, B, H), y_t (1, B, H)).
    ``xp_t`` holds the input projection and the biases that fold into it; ``rb`` (G*H,) is
    a recurrent bias that must be added after h @ R^T (GRU's candidate, under the reset
    gate), or None. Names come from the model's ``names`` with ``hint`` in front: a
    subgraph may not reuse an outer name, and the quantizer works best when no two bodies
    share one either.
    """
    H = R.shape[-1]
    w = Writer(names, prefix=f"{hint}_")
    op = w.op
    # The state is carried as (1, B, H), one direction of ONNX's (D, B, H), and each step's
    # output is (1, B, H), so Scan stacks it straight into ONNX's Y (T, 1, B, H): no
    # Gather/Unsqueeze around the loop (at one step per call, every node costs).
    h_prev = ir.val(names(f"{hint}_h_prev"), ir.DataType.FLOAT, [1, "B", H])
    xp_t = ir.val(names(f"{hint}_xp_t"), ir.DataType.FLOAT, ["B", R.shape[0]])
    hr = op("MatMul", [h_prev, w.const(np.ascontiguousarray(R.T), "RT")], hint="hr")  # (1, B, G*H)
    if rb is not None:
        hr = op("Add", [hr, w.const(rb.astype(np.float32), "rb")], hint="hr_b")
    if kind == "RNN":
        acts = _activations(node)
        pre = op("Add", [xp_t, hr], hint="pre")
        h_new = op(acts[d] if len(acts) > d else "Tanh", [pre], hint="h_cand")
    else:
        # ONNX GRU gate order z, r, h. PyTorch's GRU (linear_before_reset=1) applies the
        # reset gate to (h @ R_h^T + Rb_h); with 0, r multiplies h before its matmul.
        # z and r come from one Add and one Sigmoid over all 3H (the third block unused).
        splits = w.const(np.array([H, H, H], dtype=np.int64), "splits")
        sig = op("Sigmoid", [op("Add", [xp_t, hr], hint="gates")], hint="sig")
        z, r, _ = op("Split", [sig, splits], hint="zr", n_out=3, axis=-1)
        _, _, xh = op("Split", [xp_t, splits], hint="xs", n_out=3, axis=-1)
        if node.attributes.get_int("linear_before_reset", 0):
            _, _, hh = op("Split", [hr, splits], hint="hs", n_out=3, axis=-1)
            cand = op("Mul", [r, hh], hint="r_hh")
        else:
            rh = op("Mul", [r, h_prev], hint="rh")
            cand = op("MatMul", [rh, w.const(np.ascontiguousarray(R[2 * H:].T), "RhT")],
                      hint="rhh")
        n = op("Tanh", [op("Add", [xh, cand], hint="n_pre")], hint="n")
        # h' = (1 - z) * n + z * h = n + z * (h - n)
        zhn = op("Mul", [z, op("Sub", [h_prev, n], hint="h_minus_n")], hint="zhn")
        h_new = op("Add", [n, zhn], hint="h_cand")
    inputs = [h_prev, xp_t]
    if masked:
        # Past a row's length: hold the state, emit zeros (the fused ops' sequence_lens rule).
        m_t = ir.val(names(f"{hint}_m_t"), ir.DataType.BOOL, ["B", 1])
        inputs.append(m_t)
        h_out = op("Where", [m_t, h_new, h_prev], hint="h_next")
        y_out = op("Where", [m_t, h_new, w.const(np.zeros((), np.float32), "zero")], hint="y_t")
    else:
        h_out = h_new
        y_out = op("Identity", [h_new], hint="y_t")  # a graph output may not be listed twice
    for value in (h_out, y_out):
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape([1, "B", H])
    return ir.Graph(inputs, [h_out, y_out], nodes=w.tape.nodes,
                    initializers=w.tape.initializers, name=names(f"{hint}_step"))


def _rewrite(graph: ir.Graph, node: ir.Node, names: Names) -> None:
    """Replace one fused GRU/RNN node of ``graph`` by MatMul + Scan nodes equal to it."""
    kind = node.op_type
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    x, w_val, r_val, b_val, lens, h0 = ins[:6]
    W, R = w_val.const_value.numpy(), r_val.const_value.numpy()  # (D, G*H, I), (D, G*H, H)
    dirs, gh, H = R.shape[0], R.shape[1], R.shape[2]
    B = b_val.const_value.numpy() if b_val is not None else np.zeros((dirs, 2 * gh), np.float32)
    direction = node.attributes.get_string("direction", "forward")
    hint = node.name or kind.lower()
    w = Writer(names, prefix=f"{hint}_")
    op, const = w.op, w.const

    mask = None
    if lens is not None:
        # (T, B, 1) bool: step t is valid for row b while t < lens[b].
        shape = op("Shape", [x], hint="xshape")
        steps = op("Gather", [shape, const(np.array(0, np.int64), "zero_i")], hint="steps")
        t = op("Range", [const(np.array(0, np.int64), "start"), steps,
                         const(np.array(1, np.int64), "one_i")], hint="t")
        t2 = op("Unsqueeze", [t, const(np.array([1], np.int64), "ax1")], hint="t2")  # (T, 1)
        lens64 = op("Cast", [lens], hint="lens64", to=int(ir.DataType.INT64))
        valid = op("Less", [t2, lens64], hint="valid")  # (T, B)
        mask = op("Unsqueeze", [valid, const(np.array([2], np.int64), "ax2")], hint="mask")
    if h0 is None:
        # Omitted initial_h means zeros (D, B, H).
        shape = op("Shape", [x], hint="xshape_h")
        batch = op("Slice", [shape, const(np.array([1], np.int64), "b0"),
                             const(np.array([2], np.int64), "b1")], hint="batch")
        dims = op("Concat", [const(np.array([dirs], np.int64), "dirs"), batch,
                             const(np.array([H], np.int64), "hid")], hint="h0shape", axis=0)
        h0 = op("ConstantOfShape", [dims], hint="h0", value=ir.tensor(np.zeros(1, np.float32)))

    ys, hs = [], []
    for d in range(dirs):
        wb, rb = B[d, :gh], B[d, gh:]
        if kind == "GRU":
            # z and r take Wb + Rb outside the loop; the candidate's Rb_h must stay inside
            # (it is multiplied by r) when linear_before_reset=1; with 0, r multiplies h
            # before its matmul and Rb_h folds into the projection like the rest.
            lbr = node.attributes.get_int("linear_before_reset", 0)
            folded = wb + np.concatenate([rb[:2 * H], np.zeros(H, np.float32) if lbr else rb[2 * H:]])
            inner = np.concatenate([np.zeros(2 * H, np.float32), rb[2 * H:]]) if lbr else None
        else:
            folded, inner = wb + rb, None
        xp = op("MatMul", [x, const(W[d].T, f"WT{d}")], hint=f"xw{d}")  # (T, B, G*H)
        xp = op("Add", [xp, const(folded.astype(np.float32), f"bias{d}")], hint=f"xp{d}")
        h_d = h0
        if dirs > 1:
            h_d = op("Slice", [h0, const(np.array([d], np.int64), f"d{d}"),
                               const(np.array([d + 1], np.int64), f"d{d}end"),
                               const(np.array([0], np.int64), f"ax0_{d}")], hint=f"h0_{d}")  # (1, B, H)
        reverse = direction == "reverse" or d == 1
        body = _body(kind, node, d, R[d], inner, mask is not None, names, f"{hint}_d{d}")
        scan_in = [h_d, xp] + ([mask] if mask is not None else [])
        n_scan = len(scan_in) - 1
        h_n, y_n = op("Scan", scan_in, hint=f"scan{d}", n_out=2, body=body,
                      num_scan_inputs=n_scan, scan_input_directions=[int(reverse)] * n_scan,
                      scan_output_directions=[int(reverse)])
        hs.append(h_n)
        ys.append(y_n)
    # One direction: the Scan's outputs take the node's place, Y (T, 1, B, H) and
    # Y_h (1, B, H), with nothing in between; two are joined along the direction axis.
    old, new = [], []
    for k, (parts, axis) in enumerate(((ys, 1), (hs, 0))):
        if k < len(node.outputs) and node.outputs[k].name:
            old.append(node.outputs[k])
            new.append(parts[0] if dirs == 1 else op("Concat", parts, hint=f"cat{k}", axis=axis))
    for value in w.tape.initializers:
        graph.register_initializer(value)
    ir.convenience.replace_nodes_and_values(graph, node, [node], w.tape.nodes, old, new)


class UnfusePass(ir.passes.InPlacePass):
    """Every fused node of ``kinds`` in the main graph rewritten as MatMul + Scan.

    requires: each such node is expressible (constant weights, layout 0, no clip, the
    usual activations), else UnsupportedModelError. ensures: none is left.
    """

    def __init__(self, kinds=KINDS):
        super().__init__()
        self.kinds = tuple(kinds)

    def requires(self, model: ir.Model) -> None:
        for node in _fused(model.graph, self.kinds):
            _check(node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = _fused(graph, self.kinds)
        names = Names.of(graph)
        for node in nodes:
            _rewrite(graph, node, names)
        # Fused weights now unused are dropped so the file does not carry them twice.
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                graph.initializers.pop(name)
        return ir.passes.PassResult(model, modified=bool(nodes))

    def ensures(self, model: ir.Model) -> None:
        left = _fused(model.graph, self.kinds)
        if left:
            raise ir.passes.PostconditionError(f"fused nodes left: {[n.name for n in left]}")


def unfuse(model: onnx.ModelProto, kinds=KINDS) -> onnx.ModelProto:
    """A copy of ``model`` with every fused node of ``kinds`` in its main graph rewritten.

    The graph's inputs, outputs and metadata are unchanged. Raises UnsupportedModelError
    for a node this rewrite cannot express (computed weights, clip, layout=1, unusual
    activations).
    """
    return run(model, UnfusePass(kinds))


def has_fused(model: onnx.ModelProto, kinds=KINDS) -> bool:
    """Whether the main graph holds a fused node of ``kinds``."""
    return any(n.op_type in kinds for n in model.graph.node)
