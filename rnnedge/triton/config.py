"""config.pbtxt for a batch-first rnnedge graph served by Triton's onnxruntime backend.

Triton's sequence batcher keeps each stream's state on the server ("implicit state"):
the config pairs every state input with its output, and Triton feeds a sequence's
previous output state back as the next request's input state, starting from zeros
(``initial_state { zero_data: true }``) at the request that carries the START flag. The
graph needs no START/READY inputs: the reset is Triton's, and the ``oldest`` strategy
batches only requests that are ready, so no slot runs on padding.

Written as text, not through Triton's protobuf schema
(``tritonclient.grpc.model_config_pb2.ModelConfig`` + ``google.protobuf.text_format``):
tritonclient is a test dependency only (the [test] extra), and exporting must not need
it. The tests parse every config written with that schema, so a field Triton does not
know fails there.
"""

from __future__ import annotations

from rnnedge.errors import UnsupportedModelError

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
