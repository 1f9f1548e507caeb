"""Graphs too big for one ONNX file: ``NAME.onnx`` plus ``NAME.onnx.data``, both or neither.

A protobuf message cannot exceed 2 GiB, so a graph whose weights pass
``external_data_threshold()`` is written with ONNX external data: the weights go to
``<graph file name>.data`` beside the graph, which names it by that relative location
(onnxruntime and ``rnnedge.load(path)`` find it there). Both files are staged in a hidden
temporary folder and renamed into place together (``rnnedge.files.replace_together``).

Two routes lead there:

- staged (graphs built by ``GraphBuilder``, i.e. bare layers, of any size): inside
  ``staging(dest)``, ``to_proto`` writes the weights of a graph over the threshold straight
  from onnx_ir into the stage folder beside ``dest``, so no protobuf ever holds them; the
  export checks the staged graph by path (``check_staged``), the gate opens an onnxruntime
  session on that path, and ``commit_staged`` renames the pair into place;
- in memory (whole models traced by torch.onnx, reduced precisions, under 2 GiB only):
  ``write_with_external_data`` moves a proto's weights out as it writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

from rnnedge.errors import ExportError, ModelLoadError, UsageError, first_line
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


def weight_bytes(model) -> int:
    """The bytes of ``model``'s ``state_dict()`` tensors (0 for anything without one)."""
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    return sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))


def check_model_size(model, layer: bool, precision: str = "fp32", triton=None) -> int:
    """Refuse, before any tracing, a model over the threshold on a route that cannot take it.

    Bare layers (``layer``) over the threshold are built with external data (``staging``)
    in float32; whole models are traced by torch.onnx into one in-memory protobuf, and
    int8/fp16 conversion and the Triton variant rewrite one, which cannot exceed 2 GiB: they
    would fail only after minutes and many GiB of memory. triton: a Triton repository asked
    for (or None). Returns the weights' bytes.
    """
    nbytes = weight_bytes(model)
    if nbytes <= EXTERNAL_DATA_THRESHOLD:
        return nbytes
    size = f"the model's weights take {nbytes / 2**30:.1f} GiB"
    if not layer:
        raise UsageError(
            f"{size}: a whole model is traced by torch.onnx into one ONNX protobuf, which "
            "cannot exceed 2 GiB; export its nn.LSTM/GRU/RNN layers on their own (written with "
            "external data) or a smaller model"
        )
    if precision != "fp32":
        raise UsageError(
            f"{size}: graphs over 2 GiB are exported in float32 only ({precision} conversion "
            "rewrites one ONNX protobuf, which cannot exceed 2 GiB); export in fp32"
        )
    if triton is not None:
        raise UsageError(
            f"{size}: graphs over 2 GiB are written without a Triton repository (its variant "
            "is built in one ONNX protobuf, which cannot exceed 2 GiB); drop --triton-repo"
        )
    return nbytes


# ---------------------------------------------------------------------------
# staged: weights written once, from onnx_ir, never held in a protobuf
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Where the export to ``dest`` builds a graph over the threshold: a hidden folder
    beside ``dest`` (same file system: the pair is renamed, never copied, into place),
    named as a temporary of ``dest`` so that a killed export's is removed by the next."""

    dest: Path
    folder: Path

    @property
    def graph(self) -> Path:
        return self.folder / self.dest.name

    @property
    def data(self) -> Path:
        """The data file; the staged graph names it by this name, relative to its folder."""
        return self.folder / data_path(self.dest).name

    def make(self) -> None:
        if not self.folder.is_dir():
            remove_stale_temps(self.dest)
            try:
                self.folder.mkdir()
            except OSError as exc:
                raise write_error(self.dest, exc) from None


_STAGE: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("rnnedge_stage", default=None)


@contextlib.contextmanager
def staging(dest: str | os.PathLike) -> Iterator[Stage]:
    """While active, ``to_proto`` stages graphs over the threshold for ``dest``; the stage
    folder (made only when needed) is removed on the way out, whatever happened."""
    dest = Path(dest)
    stage = Stage(dest, temp_path(dest))
    token = _STAGE.set(stage)
    try:
        yield stage
    finally:
        _STAGE.reset(token)
        shutil.rmtree(stage.folder, ignore_errors=True)


def to_proto(model) -> onnx.ModelProto:
    """The onnx_ir ``model`` as a ModelProto. Inside ``staging`` and with initializers over
    the threshold, the initializers of MIN_EXTERNAL_TENSOR bytes or more are first written
    to the stage's data file (the proto then refers to it: a few KiB at any weight size)."""
    import onnx_ir as ir

    stage = _STAGE.get()
    inits = model.graph.initializers.values()
    nbytes = sum(v.const_value.nbytes for v in inits if v.const_value is not None)
    if stage is not None and nbytes > external_data_threshold():
        stage.make()
        try:
            ir.external_data.unload_from_model(model, stage.folder, stage.data.name,
                                               size_threshold_bytes=MIN_EXTERNAL_TENSOR)
        except OSError as exc:  # a full disk: one line, exit 2; the stage is removed
            raise write_error(stage.dest, exc) from None
    return ir.to_proto(model)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def external_bytes(model: onnx.ModelProto) -> int:
    """The bytes ``model``'s initializers keep in external data files."""
    total = 0
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
    return total


def total_size(model: onnx.ModelProto) -> int:
    """The graph file's bytes plus those of its external data."""
    return estimated_size(model) + external_bytes(model)


def check_staged(model: onnx.ModelProto, stage: Stage) -> Path:
    """Write the staged graph (no metadata yet) beside its data and run the full ONNX check
    on that path (onnx reads a file of any size by path; strict shape inference included).
    Returns the path, which the gate opens its onnxruntime sessions on."""
    try:
        stage.graph.write_bytes(model.SerializeToString())
    except OSError as exc:
        raise write_error(stage.dest, exc) from None
    try:
        onnx.checker.check_model(str(stage.graph), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"the generated graph is not valid ONNX ({first_line(exc)}); this is an rnnedge "
            "bug: please report it with the model"
        ) from exc
    return stage.graph


def inline_staged(model: onnx.ModelProto, stage: Stage) -> None:
    """Read the staged weights, if any, back into ``model`` (for the steps that rewrite one
    in-memory protobuf: int8/fp16, the Triton variant); UsageError when over 2 GiB."""
    if not has_external_data(model):
        return
    if total_size(model) > PROTOBUF_LIMIT:
        raise UsageError(f"the graph takes {total_size(model) / 2**30:.1f} GiB: graphs over 2 GiB "
                         "are exported in fp32 without a Triton repository; drop those options")
    external_data_helper.load_external_data_for_model(model, str(stage.folder))


def commit_staged(model: onnx.ModelProto, stage: Stage, inputs: Inputs | None = None) -> int:
    """Write the final ``model`` (with its metadata) beside its staged data and rename both
    onto ``stage.dest`` and its data file, both or neither; returns the bytes written."""
    dest = check_destination(stage.dest, inputs)
    data = data_path(dest)
    check_destination(data, inputs, what="external data file")
    try:
        stage.graph.write_bytes(model.SerializeToString())
        for f, final in ((stage.data, data), (stage.graph, dest)):
            os.chmod(f, final.stat().st_mode & 0o7777 if final.exists() else default_mode())
    except OSError as exc:
        raise write_error(dest, exc) from None
    # The data first: a reader who sees the new graph must find its data in place.
    replace_together([(stage.data, data), (stage.graph, dest)])
    return data.stat().st_size + dest.stat().st_size


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
