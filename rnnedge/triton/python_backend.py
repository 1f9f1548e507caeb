"""A Triton model repository for the Python backend: the rnnedge runtime hosted in Triton.

Layout written::

    DIR/<name>/config.pbtxt      backend "python", sequence batching (oldest), controls
    DIR/<name>/1/model.py        rnnedge/triton/python_model/model.py
    DIR/<name>/1/model.onnx      the proven graph itself, in its own layout

Unlike the onnxruntime route (``config.py``, implicit state), the state never leaves the
model process: ``model.py`` keeps every sequence's state in a ``Pool`` keyed by the
correlation ID. The wire format is batch-first all the same: each request carries one
row, a data tensor ``(1, *dims)`` with dims the graph's shape minus its batch axis, so no
batch-first variant of the graph (and no second gate run) is needed: the graph served is
byte for byte the one the gate proved.

The python environment that runs ``model.py`` needs numpy < 2, onnxruntime and rnnedge
(``rnnedge serve`` provisions one; ``server_env.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnedge.errors import UnsupportedModelError

MAX_BATCH_SIZE = 64
MAX_CANDIDATE_SEQUENCES = 1024
SEQUENCE_IDLE_US = 60_000_000  # a stream silent for a minute is dropped, its state freed
CONTROLS = ("START", "END", "CORRID")  # control inputs Triton's sequence batcher fills in
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
          "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class WireTensor:
    """One data input/output as a request carries it: ``(1, *dims)``, dims -1 where dynamic."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    dims: tuple


def wire_tensors(tensors) -> tuple:
    """WireTensors of runtime TensorInfos (``rnnedge.load(...).contract.inputs/outputs``)."""
    out = []
    for t in tensors:
        if t.batch_axis is None:
            raise UnsupportedModelError(
                f"tensor {t.name} {list(t.shape)} has no batch axis; Triton batches sequences "
                "along one, so this graph cannot be served")
        dims = tuple(d if isinstance(d, int) else -1
                     for i, d in enumerate(t.shape) if i != t.batch_axis)
        out.append(WireTensor(t.name, np.dtype(t.dtype).name, dims))
    return tuple(out)


def _type(dtype: str) -> str:
    if dtype not in _TYPES:
        raise UnsupportedModelError(f"Triton has no data type for {dtype}; export a float32 model")
    return _TYPES[dtype]


def _io(t: WireTensor) -> str:
    dims = ", ".join(map(str, t.dims)) if t.dims else "1"
    reshape = "" if t.dims else "\n    reshape: { shape: [ ] }"
    return (f'  {{\n    name: "{t.name}"\n    data_type: {_type(t.dtype)}\n'
            f"    dims: [ {dims} ]{reshape}\n  }}")


def _control(name: str, kind: str, body: str) -> str:
    return (f'    {{\n      name: "{name}"\n      control [\n        {{\n'
            f"          kind: {kind}\n          {body}\n        }}\n      ]\n    }}")


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}'


def python_config_text(contract, name: str, *, max_batch_size: int = MAX_BATCH_SIZE,
                       instances: int = 1, idle_us: int = SEQUENCE_IDLE_US, threads: int = 1,
                       rnnedge_path: str | None = None,
                       max_candidate_sequences: int = MAX_CANDIDATE_SEQUENCES) -> str:
    """config.pbtxt of the Python-backend model for a graph with runtime ``contract``.

    rnnedge_path: a folder put on the model's sys.path (rnnedge's source, when the server's
    python environment does not have rnnedge installed). threads: onnxruntime intra-op
    threads per instance.
    """
    inputs, outputs = wire_tensors(contract.inputs), wire_tensors(contract.outputs)
    clash = sorted({t.name for t in (*inputs, *outputs)} & set(CONTROLS))
    if clash:
        raise UnsupportedModelError(
            f"the graph's tensors {clash} clash with Triton's control inputs {list(CONTROLS)}; "
            "rename them in the model before exporting")
    flags = "int32_false_true: [ 0, 1 ]"
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [", ",\n".join(map(_io, inputs)), "]",
        "output [", ",\n".join(map(_io, outputs)), "]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {idle_us}",
        "  oldest {",
        f"    max_candidate_sequences: {max_candidate_sequences}",
        "  }",
        "  control_input [",
        ",\n".join([
            _control("START", "CONTROL_SEQUENCE_START", flags),
            _control("END", "CONTROL_SEQUENCE_END", flags),
            _control("CORRID", "CONTROL_SEQUENCE_CORRID", "data_type: TYPE_UINT64"),
        ]),
        "  ]",
        "}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
        _parameter("RNNEDGE_THREADS", str(threads)),
    ]
    if rnnedge_path:
        lines.append(_parameter("RNNEDGE_PATH", str(rnnedge_path).replace('"', '\\"')))
    return "\n".join(lines) + "\n"


def model_py() -> bytes:
    """The bytes of the Python-backend ``model.py`` (rnnedge/triton/python_model/model.py)."""
    return (Path(__file__).parent / "python_model" / "model.py").read_bytes()


def prepare_python(model_bytes: bytes, name: str, **config) -> tuple[bytes, str, dict]:
    """(graph bytes, config.pbtxt, {relative path: bytes} extra files) of the Python-backend
    model ``name`` for the serialized rnnedge graph ``model_bytes``; ``config`` goes to
    ``python_config_text``."""
    from rnnedge.runtime import load

    contract = load(bytes(model_bytes), device="cpu").contract
    return model_bytes, python_config_text(contract, name, **config), {"1/model.py": model_py()}


def write_python_repository(repo, name: str, model_bytes: bytes, **config) -> Path:
    """Write ``repo/name/{config.pbtxt, 1/model.py, 1/model.onnx}`` atomically."""
    from rnnedge.triton.repository import staged_repository

    data, text, extra = prepare_python(model_bytes, name, **config)
    with staged_repository(repo, name, data, text, extra=extra) as dest:
        return dest
