"""Graphs too big for one ONNX file: ``NAME.onnx`` plus ``NAME.onnx.data``, both or neither.

A protobuf message cannot exceed 2 GiB, so a graph whose weights pass
``external_data_threshold()`` is written with ONNX external data: the weights go to
``<graph file name>.data`` beside the graph, which names it by that relative location
(onnxruntime and ``rnnedge.load(path)`` find it there). Both files are staged in a hidden
temporary folder and renamed into place together (``rnnedge.files.replace_together``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx import external_data_helper

from rnnedge.errors import ModelLoadError, UsageError, first_line
from rnnedge.files import (
    Inputs,
    check_destination,
    default_mode,
    remove_stale_temps,
    replace_together,
    temp_path,
    write_error,
)

#: Protobuf's hard limit on one message: no single-file graph can be larger.
PROTOBUF_LIMIT = 2**31 - 1
#: Graphs (serialized bytes) above this are written with external data; below, one file.
#: 16 MiB below the protobuf limit leaves room for the metadata added after the estimate.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 2**24
#: Environment variable overriding EXTERNAL_DATA_THRESHOLD (bytes), e.g. to test the
#: two-file layout with a small graph, or to keep weights apart for a loader that wants it.
THRESHOLD_ENV = "RNNEDGE_EXTERNAL_DATA_THRESHOLD"
#: Tensors smaller than this stay inside the graph file even when the rest goes out.
MIN_EXTERNAL_TENSOR = 1024


def external_data_threshold() -> int:
    """The size in bytes above which graphs get external data (``THRESHOLD_ENV`` or default)."""
    text = os.environ.get(THRESHOLD_ENV)
    if text is None or text.strip() == "":
        return EXTERNAL_DATA_THRESHOLD
    if not text.strip().isdigit() or not 0 < int(text) <= EXTERNAL_DATA_THRESHOLD:
        raise UsageError(
            f"{THRESHOLD_ENV} must be a byte count from 1 to {EXTERNAL_DATA_THRESHOLD}, got "
            f"{text!r}; unset it for the default"
        )
    return int(text)


def estimated_size(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` in bytes, without serializing it (when protobuf
    can tell; else the initializers' raw bytes, which dominate a recurrent graph)."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - some protobuf backends refuse sizes over 2 GiB
        return sum(len(t.raw_data) for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return estimated_size(model) > external_data_threshold()


def data_path(dest: str | os.PathLike) -> Path:
    """Where the external data of the graph at ``dest`` goes: ``<dest>.data``."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".data")


def write_with_external_data(dest: str | os.PathLike, model: onnx.ModelProto,
                             inputs: Inputs | None = None) -> int:
    """Write ``model`` as ``dest`` plus ``dest.data``, both or neither; returns total bytes.

    ``model``'s large initializers are moved out of it (it is modified in place: the
    weights then live only in the written data file).
    """
    dest = check_destination(dest, inputs)
    data = data_path(dest)
    check_destination(data, inputs, what="external data file")
    remove_stale_temps(dest)
    stage = temp_path(dest)  # a folder, named so that a killed write is cleaned up next time
    try:
        stage.mkdir()
    except OSError as exc:
        raise write_error(dest, exc) from None
    try:
        external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location=data.name,
            size_threshold=MIN_EXTERNAL_TENSOR)
        try:
            (stage / data.name).touch()  # onnx appends to the file; it does not create it
            external_data_helper.write_external_data_tensors(model, str(stage))
            (stage / dest.name).write_bytes(model.SerializeToString())
            for f, final in ((stage / data.name, data), (stage / dest.name, dest)):
                os.chmod(f, final.stat().st_mode & 0o7777 if final.exists() else default_mode())
        except OSError as exc:
            raise write_error(dest, exc) from None
        # The data first: a reader who sees the new graph must find its data in place.
        replace_together([(stage / data.name, data), (stage / dest.name, dest)])
        return data.stat().st_size + dest.stat().st_size
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_model_size(model) -> int:
    """Refuse, before any tracing, a model whose weights cannot fit the in-memory graph.

    The parity gate checks and runs the graph from one serialized protobuf, which cannot
    exceed 2 GiB, so such a model would fail only after minutes and many GiB of memory.
    model: anything with a ``state_dict()`` of tensors; returns its weights' bytes.
    """
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    nbytes = sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        raise UsageError(
            f"the model's weights take {nbytes / 2**30:.1f} GiB: the parity gate holds the graph in "
            f"one ONNX protobuf, which cannot exceed 2 GiB; export a smaller model or split it "
            "(graphs between the threshold set by " + THRESHOLD_ENV + " and 2 GiB are written "
            "with external data)"
        )
    return nbytes


def inline_external_data(model: onnx.ModelProto, graph_path: str | os.PathLike) -> bytes | None:
    """``model`` serialized with its external data read in from beside ``graph_path``, for
    the tools that run a graph from bytes (verify, bench); None when it has none.

    The data file must lie in the graph's folder (onnx refuses locations that escape it).
    """
    if not any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        return None
    folder = Path(graph_path).parent
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - onnx raises OSError, ValueError, ValidationError
        raise ModelLoadError(
            f"{graph_path}: its external data cannot be read from {folder} ({first_line(exc)}); "
            f"keep {data_path(graph_path).name} beside the graph"
        ) from None
    if estimated_size(model) > PROTOBUF_LIMIT:
        raise UsageError(f"{graph_path} with its external data is over 2 GiB, more than rnnedge "
                         "verify and bench can hold in one protobuf; run it with rnnedge.load(path)")
    return model.SerializeToString()
