"""A Triton Inference Server model repository for an rnnedge graph.

Layout written (onnxruntime backend)::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx

Triton's sequence batcher keeps each stream's state on the server ("implicit state"):
the config pairs every state input with its output, and Triton feeds a sequence's
previous output state back as the next request's input state, starting from zeros
(``initial_state { zero_data: true }``) at the request that carries the START flag. The
graph needs no START/READY inputs: the reset is Triton's, and the ``oldest`` strategy
batches only requests that are ready, so no slot runs on padding.

Triton batches along the first axis of every input, output and state. rnnedge's stack
graphs keep PyTorch's layouts — state (layers*dirs, batch, hidden), and time-major data
(time, batch, features) for layers built without batch_first — so for Triton the proven
graph is wrapped with Transposes into a batch-first variant, which gets its own contract
(states with ``batch_axis`` 0) and its own run of the parity gate (``batch_first_plan``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from rnnedge.errors import UnsupportedModelError, UsageError

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
}
MAX_BATCH_SIZE = 64
MAX_CANDIDATE_SEQUENCES = 1024
SEQUENCE_IDLE_US = 60_000_000  # a stream silent for a minute is dropped, its state freed


def check_name(name) -> str:
    """A Triton model name: letters, digits, '_' and '-' only (it is a folder name)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        hint = re.sub(r"[^A-Za-z0-9_-]", "_", str(name)).strip("_") or "model"
        raise UsageError(
            f"Triton model name {name!r} is not valid: use letters, digits, '_' and '-' only "
            f"(it names the model's folder); e.g. --triton-name {hint}"
        )
    return name


def check_target(repo, name: str) -> Path:
    """Refuse, before any work, a repository folder that cannot be written."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"Triton repository {repo} is a file; give a folder (it may not exist yet)")
    parent = repo if repo.is_dir() else repo.parent
    if not parent.is_dir():
        raise UsageError(
            f"cannot write Triton repository {repo}: its parent folder {parent} does not exist; "
            "create it first or choose another --triton-repo"
        )
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write Triton repository {repo}: {parent} is not writable")
    return repo / name


# ---------------------------------------------------------------------------
# The batch-first variant
# ---------------------------------------------------------------------------


def _to_front(rank: int, axis: int) -> list[int]:
    """The permutation that moves ``axis`` to position 0, others in order."""
    return [axis] + [i for i in range(rank) if i != axis]


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename every read of ``old`` in ``graph`` (and its subgraphs) and its producer."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for k, name in enumerate(node.output):
            if name == old:
                node.output[k] = new
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _rename_uses(sub, old, new)
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


def _fresh(graph: onnx.GraphProto, hint: str) -> str:
    used = {v for n in graph.node for v in (*n.input, *n.output, n.name)}
    used |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    name, i = hint, 0
    while name in used:
        i += 1
        name = f"{hint}_{i}"
    return name


def _permute_vi(vi: onnx.ValueInfoProto, perm: list[int]) -> None:
    dims = list(vi.type.tensor_type.shape.dim)
    copies = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for dst, src in zip(copies, (dims[p] for p in perm)):
        dst.CopyFrom(src)
    del vi.type.tensor_type.shape.dim[:]
    vi.type.tensor_type.shape.dim.extend(copies)


def _moves(spec) -> dict[str, list[int]]:
    """{graph name: perm to batch-first} for each data tensor/state not batch-first yet."""
    moves = {}
    for t in (*spec.inputs, *spec.outputs):
        if "batch" in t.shape and t.shape.index("batch") != 0:
            moves[t.name] = _to_front(len(t.shape), t.shape.index("batch"))
    for s in spec.states:
        if s.batch_axis != 0:
            perm = _to_front(len(s.shape), s.batch_axis)
            moves[s.input] = moves[s.output] = perm
    return moves


def batch_first_graph(model: onnx.ModelProto, spec) -> onnx.ModelProto:
    """``model`` with every data input/output and state moved to batch-first by Transposes.

    Names, dtypes and everything inside stay; a moved input ``x`` becomes a new graph input
    ``x`` (batch first) feeding Transpose -> the old consumers; a moved output is the
    Transpose of what the graph produced.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    moves = _moves(spec)
    added = []
    inputs = {vi.name: vi for vi in g.input}
    outputs = {vi.name: vi for vi in g.output}
    for name, perm in moves.items():
        if name in inputs:
            inner = _fresh(g, f"{name}_native")
            _rename_uses(g, name, inner)
            _permute_vi(inputs[name], perm)
            added.append(helper.make_node("Transpose", [name], [inner], perm=_inverse(perm),
                                          name=_fresh(g, f"{name}_to_native")))
        if name in outputs:
            inner = _fresh(g, f"{name}_native")
            _rename_uses(g, name, inner)
            _permute_vi(outputs[name], perm)
            g.node.append(helper.make_node("Transpose", [inner], [name], perm=perm,
                                           name=_fresh(g, f"{name}_to_batch_first")))
    for node in reversed(added):  # input Transposes first: the graph stays topologically sorted
        g.node.insert(0, node)
    return out


def batch_first_spec(spec):
    """The contract of ``batch_first_graph``: shapes permuted, states with batch_axis 0."""
    from rnnedge.contract import StateSpec, TensorSpec

    moves = _moves(spec)

    def tensor(t):
        if t.name not in moves:
            return t
        return TensorSpec(t.name, t.dtype, tuple(t.shape[p] for p in moves[t.name]))

    inputs = tuple(tensor(t) for t in spec.inputs)
    outputs = tuple(tensor(t) for t in spec.outputs)
    states = tuple(
        StateSpec(s.input, s.output, s.dtype, tuple(s.shape[p] for p in moves[s.input]), 0, s.init)
        if s.input in moves else s
        for s in spec.states
    )
    time_axis = spec.time_axis
    if time_axis is not None:
        timed = {t.shape.index("time") for t in inputs if "time" in t.shape}
        if len(timed) > 1:
            raise UnsupportedModelError(
                "the graph's data inputs put time on different axes once batch-first; "
                "Triton serving needs one time axis"
            )
        time_axis = timed.pop() if timed else time_axis
    return spec.replace(inputs=inputs, outputs=outputs, states=states, time_axis=time_axis)


def batch_first_plan(plan, model: onnx.ModelProto):
    """(plan, graph) for the batch-first variant of ``model`` (the graph ``plan`` proves).

    The returned plan's spec is ``batch_first_spec``; its reference and sample are the
    original's with inputs, outputs and states transposed, so the same eager model checks
    the variant through the same gate.
    """
    from rnnedge.gate.parity import Plan

    spec = plan.spec
    moves = _moves(spec)
    new_spec = batch_first_spec(spec)
    graph = batch_first_graph(model, spec)

    def move(arrays: dict, forward: bool) -> dict:
        out = {}
        for k, v in arrays.items():
            perm = moves.get(k)
            out[k] = v if perm is None else np.ascontiguousarray(
                np.transpose(v, perm if forward else _inverse(perm)))
        return out

    def reference(inputs: dict, states: dict):
        outs, new_states = plan.reference(move(inputs, False), move(states, False))
        return move(outs, True), move(new_states, True)

    def sample(rng, batch, time):
        return move(plan.sample(rng, batch, time), True)

    return Plan(new_spec, graph, reference, sample, plan.lengths_input), graph


# ---------------------------------------------------------------------------
# config.pbtxt
# ---------------------------------------------------------------------------


def _dims(shape) -> list[int]:
    """Triton dims of a batch-first shape: the batch axis dropped, dynamic axes as -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def _type(dtype: str) -> str:
    if dtype not in _TYPES:
        raise UnsupportedModelError(f"Triton has no data type for {dtype}; export a float32 model")
    return _TYPES[dtype]


def _io_block(t) -> str:
    dims = _dims(t.shape)
    lines = ["  {", f'    name: "{t.name}"', f"    data_type: {_type(t.dtype)}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:
        # A (batch,) tensor, e.g. lengths: each request sends [1], the model sees (batch,).
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "\n".join(lines + ["  }"])


def config_text(spec, name: str, *, precision: str = "fp32",
                max_batch_size: int = MAX_BATCH_SIZE,
                max_candidate_sequences: int = MAX_CANDIDATE_SEQUENCES) -> str:
    """config.pbtxt for a batch-first ``spec`` (every tensor and state batch on axis 0)."""
    for t in (*spec.inputs, *spec.outputs):
        if "batch" not in t.shape or t.shape.index("batch") != 0:
            raise UnsupportedModelError(
                f"tensor {t.name} {list(t.shape)} is not batch-first; Triton batches axis 0")
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_io_block(t) for t in spec.inputs),
        "]",
        "output [",
        ",\n".join(_io_block(t) for t in spec.outputs),
        "]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {SEQUENCE_IDLE_US}",
        "  oldest {",
        f"    max_candidate_sequences: {max_candidate_sequences}",
        "  }",
        "  state [",
    ]
    blocks = []
    for s in spec.states:
        if s.batch_axis != 0:
            raise UnsupportedModelError(f"state {s.input} is not batch-first")
        dims = _dims(s.shape)
        if any(d < 0 for d in dims):
            raise UnsupportedModelError(
                f"state {s.input} {list(s.shape)} has a dynamic axis besides batch; Triton's "
                "zero initial state needs fixed sizes")
        text = ", ".join(map(str, dims))
        blocks.append("\n".join([
            "    {",
            f'      input_name: "{s.input}"',
            f'      output_name: "{s.output}"',
            f"      data_type: {_type(s.dtype)}",
            f"      dims: [ {text} ]",
            "      initial_state {",
            f"        data_type: {_type(s.dtype)}",
            f"        dims: [ {text} ]",
            "        zero_data: true",
            f'        name: "{s.input}_zeros"',
            "      }",
            "    }",
        ]))
    lines += [",\n".join(blocks), "  ]", "}"]
    if precision == "int8":
        # int8 kernels (DynamicQuantizeLSTM, MatMulInteger) are CPU kernels in onnxruntime.
        lines += ["instance_group [", "  {", "    kind: KIND_CPU", "  }", "]"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def staged_repository(repo, name: str, model_bytes: bytes, config: str):
    """Put ``repo/name/{config.pbtxt,1/model.onnx}`` in place; yields the model folder.

    Built in a hidden temporary folder inside ``repo`` and renamed into place, so a reader
    (or a polling Triton) sees the old model folder or the new one, never half of one; an
    existing ``repo/name`` is replaced as a whole. ``repo`` itself is created if missing.
    If the body of the ``with`` raises (e.g. the graph file beside it cannot be written),
    everything is rolled back: the previous model folder returns, a created repo goes.
    """
    from rnnedge.files import default_mode

    dest = check_target(repo, check_name(name))
    repo = dest.parent
    created = not repo.exists()
    if created:
        repo.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    old, placed = None, False
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would hide it from Triton
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(model_bytes)
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=repo))
            old.rmdir()
            os.replace(dest, old)
        os.replace(tmp, dest)
        placed = True
        yield dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if placed:
            shutil.rmtree(dest, ignore_errors=True)
        if old is not None and old.exists():
            os.replace(old, dest)  # put the previous model back
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_repository(repo, name: str, model_bytes: bytes, config: str) -> Path:
    """Write ``repo/name/{config.pbtxt,1/model.onnx}`` atomically; returns the model folder."""
    with staged_repository(repo, name, model_bytes, config) as dest:
        return dest
