"""Reduced-precision variants of an exported graph: int8 weights (CPU) and float16 (GPU).

Both take the float32 graph the exporter built and return a graph with the same inputs,
outputs, state pairs and metadata, which then goes through this module's ``run_gate``
against the same eager model: teacher-forced steps within ``spec.TOLERANCES["int8"]`` /
``["float16"]``, and the usual whole-sequence and streamed cases within a drift bound
(see "The gate for reduced precisions" below, and docs/deploy.md).

int8 — onnxruntime's dynamic quantization (``quantize_dynamic``): weights stored as int8
with a float scale, activations quantized per call. Fused LSTM nodes become
com.microsoft ``DynamicQuantizeLSTM``; GRU and RNN have no int8 kernel there, so they are
first rewritten as MatMul + Scan (``unfused.unfuse``) and their MatMuls — the input
projection outside the loop and ``h @ R^T`` inside the Scan body — are quantized. The
quantizer must be told to enter subgraphs (``EnableSubgraph``) for the latter.

float16 — ``onnxruntime.transformers.float16.convert_float_to_float16`` with
``keep_io_types=True``: weights and activations in float16, graph inputs and outputs
(data and state) stay float32 so callers and the contract do not change. onnxruntime's
CPU provider has no float16 RNN/LSTM/GRU kernels: on CPU it inserts Casts and runs those
nodes in float32 on the float16-rounded weights. The gate therefore runs on CUDA where
it is usable; on a CPU-only machine it checks the graph as converted on the CPU, which
proves the conversion (weights rounded to float16, float16 tensors between nodes, float32
I/O) but not CUDA's float16 arithmetic — the metadata records which provider ran it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from rnnedge.errors import ExportError, UnsupportedModelError, UsageError, first_line
from rnnedge.gate import parity
from rnnedge.gate.parity import CaseResult, compare

PRECISIONS = ("fp32", "fp16", "int8")
#: The TOLERANCES key each precision's gate uses (fp32 uses the graph's own dtype).
TOLERANCE_KEYS = {"fp16": "float16", "int8": "int8"}
FP16_MAX = 65504.0
# Ops the dynamic quantizer emits; one of them must appear or nothing was quantized.
_INT8_OPS = {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul",
             "DynamicQuantizeLinear", "ConvInteger"}


def check_precision(precision) -> str:
    """``precision`` validated: one of PRECISIONS (None means "fp32")."""
    if precision is None:
        return "fp32"
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise UsageError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; "
            "int8 is for CPUs (--quantize int8), fp16 for GPUs (--precision fp16)"
        )
    return precision.lower()


def tolerance_key(precision: str, dtype: str) -> str:
    """The spec.TOLERANCES key for a ``precision`` export whose outputs have ``dtype``."""
    return TOLERANCE_KEYS.get(precision, dtype)


def convert(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """``model`` (float32) in ``precision``: the same model for "fp32", else a new one."""
    precision = check_precision(precision)
    if precision == "int8":
        return to_int8(model)
    if precision == "fp16":
        return to_fp16(model)
    return model


def _walk(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (Scan/Loop/If bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk(g)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type, subgraphs included."""
    counts: dict[str, int] = {}
    for node in _walk(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 weight quantization (per tensor, int8 weights, uint8 activations).

    Per-channel scales were tried: no measurable accuracy gain on these graphs, and
    onnxruntime's CPU kernel rejects them for the batched (D, P, H) projection MatMul of
    ``proj_size`` LSTMs.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rnnedge.graphs.unfuse import unfuse

    source = unfuse(model)  # GRU/RNN -> MatMul + Scan; LSTM stays fused (it has a kernel)
    # The quantizer rewrites Gemm as MatMul with a transposed weight but keeps the old
    # value_info of that weight, then fails its own shape inference; it re-infers anyway.
    del source.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix="rnnedge-int8-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(source, src)
        # The quantizer logs a warning per model about pre-processing; the gate is our check.
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False,
                             extra_options={"EnableSubgraph": True})
        except Exception as exc:  # noqa: BLE001 - the quantizer raises plain exceptions
            first = first_line(exc)
            raise ExportError(
                f"onnxruntime's int8 quantizer failed on the graph ({first}); export in "
                "float32 (leave out --quantize) and report the model"
            ) from exc
        finally:
            logging.getLogger().setLevel(quiet)
        out = onnx.load(dst)
    if not set(op_counts(out)) & _INT8_OPS:
        raise UnsupportedModelError(
            "int8 quantization found no weights it can quantize in this graph (no LSTM, "
            "GRU, RNN or MatMul with constant weights); export it in float32"
        )
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _fp16_range_check(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size and float(np.max(np.abs(arr))) > FP16_MAX:
            raise UnsupportedModelError(
                f"weight {init.name} holds values up to {float(np.max(np.abs(arr))):.3g}, beyond "
                f"float16's range (±{FP16_MAX:g}); export it in float32 or int8"
            )


def _toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` topologically, in place.

    convert_float_to_float16(keep_io_types=True) appends the Casts of graph inputs after
    the nodes that read them, which onnx's checker (rightly) rejects.
    """
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if (set(node.input) | _outer_refs(node)) <= known:
                order.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError("the float16 graph has a cycle or a dangling input; this is an "
                              "rnnedge bug: please report it with the model")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def _outer_refs(node: onnx.NodeProto) -> set:
    """Values that ``node``'s subgraphs (Scan/Loop/If bodies) read from the outer scope."""
    used, defined = set(), set()
    stack = []
    for attr in node.attribute:
        stack += [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    while stack:
        g = stack.pop()
        defined |= {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            used |= set(n.input)
            defined |= set(n.output)
            for a in n.attribute:
                stack += [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
    return used - defined


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and activations; float32 graph inputs and outputs (data and state)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _fp16_range_check(model)
    # onnxruntime 1.31's CPU NchwcTransformer (ORT_ENABLE_ALL) crashes the process on a
    # float16 Transpose feeding a MatMul (e.g. batch_first -> Linear head in whole models):
    # those Transposes stay float32, between Casts, which it handles.
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for k, node in enumerate(named.graph.node):
        node.name = node.name or f"rnnedge_node_{k}"  # the block list goes by node name
    model = named
    consumers = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    keep = [n.name for n in model.graph.node
            if n.op_type == "Transpose" and set(n.output) & consumers]
    try:
        out = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
        first = first_line(exc)
        raise ExportError(
            f"onnxruntime's float16 converter failed on the graph ({first}); export in "
            "float32 (leave out --precision) and report the model"
        ) from exc
    _toposort(out.graph)
    return out


def gate_providers(precision: str, model_bytes: bytes) -> tuple[tuple[str, ...], str]:
    """(providers, device) on which the gate should run a ``precision`` graph.

    float16 runs on CUDA when onnxruntime can use it here, since that is where float16
    kernels run and where fp16 graphs are meant to be deployed; everything else, and fp16
    without a usable GPU, runs on the CPU.
    """
    cpu = ("CPUExecutionProvider",)
    if precision != "fp16":
        return cpu, "cpu"
    import warnings

    from rnnedge.runtime.providers import create_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback to the CPU is an answer here, not news
        _, device = create_session(model_bytes, "auto", 1)
    if device.startswith("cuda"):
        return ("CUDAExecutionProvider", "CPUExecutionProvider"), device
    return cpu, "cpu"


def cpu_fp32_fallback_nodes(model_bytes: bytes) -> int:
    """How many float16 nodes onnxruntime's CPU provider runs in float32 (through inserted
    Casts) for lack of a float16 kernel. 0 for a graph without float16."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rnnedge-fp16-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = path
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    wrapped = set()
    for node in optimized.graph.node:
        if node.op_type != "Cast" and any(i.startswith("InsertedPrecisionFreeCast_")
                                          for i in node.input):
            wrapped.add(node.name)
    return len(wrapped)


# ---------------------------------------------------------------------------
# The gate for reduced precisions
# ---------------------------------------------------------------------------
#
# Quantization error compounds through a recurrence: over the gate's 53 random steps a
# trained int8 LSTM/GRU drifts 0.1-0.2 (max abs) from eager, a chaotic trained RNN 0.4,
# while a random tiny model stays within 0.015 — and a broken graph (gates swapped, a
# bias dropped, a direction reversed) can miss by as little as 0.1. No element-wise
# tolerance separates the two on the free-running cases, so the gate checks two things:
#
# - teacher-forced steps: every step starts from *eager's* state, so the error is one
#   step's quantization error (<= 0.02 measured on trained models) and any wrong gate,
#   bias or weight shows in full; compared element-wise with TOLERANCES[precision];
# - the usual free-running cases (whole sequences, 1-step and uneven chunks, state
#   carried): each output and state must stay within a normalized RMSE,
#   rms(graph - eager) / rms(eager) <= DRIFT[precision]. Measured: working int8 graphs
#   0.004-0.025 (LSTM/GRU), 0.12 (chaotic RNN); a reversed direction or swapped gates
#   0.43 and up; float16 0.003 at most.

DRIFT = {"int8": 0.25, "fp16": 0.05}
TEACHER_FORCED = ((1, 53), (3, 53))  # (batch, steps)


def _nrmse(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")
    if want.size == 0:
        return 0.0
    scale = max(float(np.sqrt(np.mean(want**2))), 1e-6)
    return float(np.sqrt(np.mean((got - want) ** 2))) / scale


def _pairs(spec, got_outs, got_states, want_outs, want_states):
    pairs = [(k, got_outs.get(k), want_outs[k]) for k in want_outs]
    return pairs + [(s.output, got_states.get(s.input), want_states[s.input]) for s in spec.states]


def _drift_case(plan, graph, rng, case, limit):
    got, got_states, want, want_states = parity.case_arrays(plan, graph, rng, case)
    worst_abs = worst_rel = worst_drift = 0.0
    misses = []
    for tensor, g, w in _pairs(plan.spec, got, got_states, want, want_states):
        if g is None:
            misses.append((tensor, float("inf"), float("inf")))
            continue
        a, r, _ = compare(g, w, 0.0, 0.0)
        drift = _nrmse(g, w)
        worst_abs, worst_rel, worst_drift = max(worst_abs, a), max(worst_rel, r), max(worst_drift, drift)
        if not drift <= limit:
            misses.append((tensor, a, drift))
    return CaseResult(case[0], worst_abs, worst_rel, not misses, misses, drift=worst_drift)


def _teacher_forced(plan, graph, rng, batch, steps, atol, rtol):
    """Each step from eager's state; every output and state compared element-wise."""

    spec = plan.spec
    states = parity.initial_states(spec, rng, batch, batch > 1)
    inputs = plan.sample(rng, batch, steps) if spec.time_axis is not None else None
    worst_abs = worst_rel = 0.0
    misses = {}
    for t in range(steps):
        if inputs is None:
            x = plan.sample(rng, batch, None)
        else:
            x = parity.slice_time(inputs, spec.time_axis, t, t + 1, spec)
            if plan.lengths_input:
                x[plan.lengths_input] = np.ones(batch, dtype=np.int64)
        want, want_states = plan.reference(x, dict(states))
        got, got_states = graph(x, dict(states))
        for tensor, g, w in _pairs(spec, got, got_states, want, want_states):
            a, r, ok = (float("inf"), float("inf"), False) if g is None else compare(g, w, atol, rtol)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            if not ok:
                prev = misses.get(tensor, (tensor, 0.0, 0.0))
                misses[tensor] = (tensor, max(prev[1], a), max(prev[2], r))
        states = want_states  # teacher forcing: the next step starts from eager's state
    return CaseResult(f"teacher-forced B={batch} N={steps}", worst_abs, worst_rel, not misses,
                      list(misses.values()))


def run_gate(plan, model_bytes: bytes, precision: str, atol: float, rtol: float, *,
             providers=("CPUExecutionProvider",), progress=None) -> list:
    """The parity gate for an int8/fp16 graph: the standard cases judged by drift, plus
    teacher-forced steps judged element-wise by (atol, rtol). Returns parity.CaseResults."""

    graph = parity.GraphRunner(plan, model_bytes, providers)
    rng = np.random.default_rng(parity.SEED)
    limit = DRIFT[precision]
    jobs = [(case[0], lambda c=case: _drift_case(plan, graph, rng, c, limit))
            for case in parity.gate_cases(plan)]
    jobs += [(f"teacher-forced B={b} N={n}",
              lambda b=b, n=n: _teacher_forced(plan, graph, rng, b, n, atol, rtol))
             for b, n in TEACHER_FORCED]
    results = []
    for name, job in jobs:
        if progress:
            progress(name)
        try:
            results.append(job())
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run is a failed case
            results.append(parity.CaseResult(name, float("inf"), float("inf"), False, [],
                                             first_line(exc, 300)))
    return results


def summarize(results: list, precision: str, device: str, atol: float, rtol: float) -> dict:
    """The metadata ``parity`` entry of a reduced-precision graph."""

    summary = parity.summarize(results)
    summary.update(precision=precision, device=device, atol=atol, rtol=rtol,
                   drift=max((r.drift or 0.0 for r in results), default=0.0),
                   drift_limit=DRIFT[precision])
    return summary


def raise_on_failure(results: list, precision: str, atol: float, rtol: float) -> None:
    """ParityError naming each failing case, if any case failed."""
    from rnnedge.errors import ParityError

    failed = [r for r in results if not r.passed]
    if not failed:
        return
    # Teacher-forced steps are judged element-wise, whole sequences by drift.
    parts = [parity.describe_failure(r) if r.name.startswith("teacher") else
             parity.describe_failure(r, "{t} drift={e:.3g} (max_abs={a:.3g})") for r in failed]
    steps_ok = all(r.passed for r in results if r.name.startswith("teacher"))
    advice = (
        "One step at a time the graph matches, but the error compounds over the sequence: "
        f"this model is sensitive to {precision} rounding; check its task accuracy with "
        "rnnedge.exporters.precision.agreement, or export it in float32"
        if steps_ok else
        f"Single steps already differ beyond atol={atol:g}, rtol={rtol:g}: if the differences "
        "are small, loosen atol/rtol (--atol/--rtol); if large, the converted graph is wrong: "
        "report the model with this message"
    )
    raise ParityError(
        f"{precision} parity gate failed: {len(failed)} of {len(results)} cases differ from eager "
        f"PyTorch (teacher-forced steps: atol={atol:g}, rtol={rtol:g}; whole sequences: "
        f"drift <= {DRIFT[precision]:g}): " + " ".join(parts) + f"; nothing was written. {advice}",
        failures=failed,
    )


# ---------------------------------------------------------------------------
# Task-level check: how much a reduced-precision graph changes what the model does.
# ---------------------------------------------------------------------------


@dataclass
class Agreement:
    """A reduced-precision graph against its float32 graph on the same inputs.

    reference/candidate: each data output by name, from the float32 / other graph.
    max_abs, rmse: per output. top1: per output, the fraction of positions (every index
    but the last axis) whose argmax over the last axis is the same in both — a
    classifier's agreement.
    """

    reference: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)
    max_abs: dict = field(default_factory=dict)
    rmse: dict = field(default_factory=dict)
    top1: dict = field(default_factory=dict)


def _contract(model: onnx.ModelProto) -> dict:
    import json

    from rnnedge.contract import METADATA_KEY

    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise UsageError("the graph has no rnnedge metadata: pass graphs written by rnnedge.export")
    return json.loads(props[METADATA_KEY])


def run_graph(path, inputs, threads: int = 1) -> dict:
    """Data outputs of the rnnedge graph at ``path`` for ``inputs``, from zero states.

    inputs: {name: array} for the graph's data inputs, or one array when it has one, e.g.
    (batch, time, features) for a batch-first layer; the whole sequence in one call.
    """
    import onnxruntime as ort

    model = onnx.load(os.fspath(path))
    meta = _contract(model)
    if not isinstance(inputs, dict):
        if len(meta["inputs"]) != 1:
            names = ", ".join(t["name"] for t in meta["inputs"])
            raise UsageError(f"the graph takes several inputs ({names}); pass a dict")
        inputs = {meta["inputs"][0]["name"]: inputs}
    first = np.asarray(next(iter(inputs.values())))
    batch_axis = list(meta["inputs"][0]["shape"]).index("batch")
    batch = first.shape[batch_axis]
    feeds = {k: np.asarray(v) for k, v in inputs.items()}
    for s in meta["states"]:
        shape = [batch if i == s["batch_axis"] else d for i, d in enumerate(s["shape"])]
        feeds[s["input"]] = np.zeros(shape, dtype=s["dtype"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [t["name"] for t in meta["outputs"]]
    return dict(zip(names, sess.run(names, feeds)))


def agreement(fp32_path, other_path, inputs) -> Agreement:
    """Run the float32 graph and a reduced-precision graph of the same model on ``inputs``.

    inputs: as for ``run_graph``. Returns an ``Agreement`` (both graphs' outputs, their
    max abs difference and RMSE, and top-1 agreement over the last axis).
    """
    ref = run_graph(fp32_path, inputs)
    got = run_graph(other_path, inputs)
    result = Agreement(reference=ref, candidate=got)
    for name, want in ref.items():
        have = got[name]
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
        result.max_abs[name] = float(diff.max()) if diff.size else 0.0
        result.rmse[name] = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
        if want.ndim and want.shape[-1] > 1:
            result.top1[name] = float(np.mean(want.argmax(-1) == have.argmax(-1)))
    return result
