"""``rnnedge.load``: a graph, its contract and its session, from which streams and pools are made."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import onnxruntime as ort

from rnnedge.errors import ModelLoadError, UsageError, first_line
from rnnedge.runtime.contract import METADATA_KEY, Contract, graph_io, read_contract
from rnnedge.runtime.inputs import native
from rnnedge.runtime.pool import Pool
from rnnedge.runtime.providers import EXTERNAL_DATA_FOLDER, create_session, on_device
from rnnedge.runtime.stream import Stream


class Model:
    """A loaded graph. Thread-safe: any number of threads may make and use their own
    streams and pools from one Model (each Stream/Pool is for one thread at a time).

    session: the onnxruntime InferenceSession. device: "cpu" or "cuda:N".
    contract: the Contract (data inputs/outputs, states, axes, mode).
    check_finite: whether its streams and pools refuse NaN/inf unless told otherwise.
    """

    def __init__(self, session: ort.InferenceSession, contract: Contract, device: str, source: str,
                 check_finite: bool = True):
        self.session = session
        self.contract = contract
        self.device = device
        self.source = source
        self.check_finite = check_finite  # the default of the streams and pools made from it

    def __repr__(self) -> str:
        return (f"<rnnedge Model {self.source} on {self.device}: inputs {self.input_names}, "
                f"outputs {self.output_names}, states {self.state_names}>")

    @property
    def input_names(self) -> list[str]:
        """The graph's non-state inputs (data, and for foreign graphs any to bind as constants)."""
        return [t.name for t in self.contract.inputs]

    @property
    def output_names(self) -> list[str]:
        """The graph's data outputs (a step returns these)."""
        return [t.name for t in self.contract.outputs]

    @property
    def state_names(self) -> list[str]:
        """The state input names (the keys of ``Stream.state``)."""
        return [s.input for s in self.contract.states]

    @property
    def metadata(self) -> dict | None:
        """The parsed rnnedge metadata, or None for a graph without it."""
        return self.contract.metadata

    def stream(self, batch: int = 1, constants: dict | None = None, *,
               check_finite: bool | None = None) -> Stream:
        """A new stream of ``batch`` rows with a zero state.

        constants: {input name: array} for graph inputs that are neither data nor state
        (e.g. a scalar sample rate of a foreign graph), or data inputs the contract marks
        constant (e.g. an attention decoder's memory, with ``batch`` rows): bound once,
        not passed to step().
        check_finite: refuse NaN/inf (see Stream); None takes the Model's (``load``'s) setting.
        """
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise UsageError(f"batch must be an int >= 1, got {batch!r}")
        data, bound = self._split(constants, "stream()")
        for t in self.contract.inputs:  # a constant with a batch axis holds one row per row
            if t.name in bound and t.batch_axis is not None \
                    and bound[t.name].shape()[t.batch_axis] != batch:
                raise UsageError(f"stream(): constant {t.name!r} has {bound[t.name].shape()[t.batch_axis]} "
                                 f"rows (axis {t.batch_axis}) but the stream has batch={batch}")
        for t in data:
            if t.batch_axis is not None and isinstance(t.shape[t.batch_axis], int) \
                    and t.shape[t.batch_axis] != batch:
                raise UsageError(f"input {t.name!r} has a fixed batch of {t.shape[t.batch_axis]} "
                                 f"in this graph; make streams with batch={t.shape[t.batch_axis]}")
        return Stream(self, int(batch), data, bound, self._check_finite(check_finite))

    def pool(self, constants: dict | None = None, *, check_finite: bool | None = None) -> Pool:
        """A new, empty pool of single-row streams stepped as one batch (see Pool).

        constants: as for ``stream``, shared by every stream of the pool; inputs that the
        contract marks constant and that have a batch axis are given per stream instead,
        ``pool.add(constants={name: array with batch 1})``.
        """
        per_stream = [t.name for t in self.contract.inputs if t.constant and t.batch_axis is not None]
        shared = [name for name in (constants or {}) if name in per_stream]
        if shared:
            raise UsageError(f"pool(): {shared} are constant per stream (one row each): give them "
                             "to pool.add(constants={...}) for each stream, not to pool()")
        data, bound = self._split(constants, "pool()")
        return Pool(self, data, bound, self._check_finite(check_finite))

    def _check_finite(self, value) -> bool:
        if value is None:
            return self.check_finite
        if not isinstance(value, bool):
            raise UsageError(f"check_finite must be True, False or None, got {value!r}")
        return value

    def _split(self, constants, where: str) -> tuple[tuple, dict]:
        """(data inputs, {name: OrtValue}) once ``constants`` are taken out of the inputs."""
        constants = {} if constants is None else constants
        if not isinstance(constants, dict):
            raise UsageError(f"{where}: constants must be a dict {{input name: array}}, got "
                             f"{type(constants).__name__}")
        specs = {t.name: t for t in self.contract.inputs}
        unknown = [name for name in constants if name not in specs]
        if unknown:
            raise UsageError(f"{where}: constants {unknown} are not non-state inputs of this graph; "
                             f"it has {list(specs)}")
        bound = {}
        for name, value in constants.items():
            value = native(np.asarray(value))
            t = specs[name]
            if value.dtype != t.dtype or value.ndim != len(t.shape) or any(
                    isinstance(d, int) and d != g for d, g in zip(t.shape, value.shape)):
                raise UsageError(f"{where}: constant {name!r} must be {t.describe()}, got "
                                 f"{value.dtype.name}{list(value.shape)}")
            value = np.ascontiguousarray(value).copy()  # ours: the caller may change theirs
            bound[name] = on_device(value, self.device)
        data = tuple(t for t in self.contract.inputs if t.name not in bound)
        return data, bound


def load(path, device: str = "auto", threads: int | None = None, *, state_map: dict | None = None,
         batch_axes: dict | None = None, time_axis: int | None = None, check_finite: bool = True,
         external_data_dir=None) -> Model:
    """Load an ONNX graph to stream it.

    path: a .onnx file (or the serialized model as bytes).
    device: "auto" (CUDA when usable, else CPU with one DeviceFallbackWarning), "cpu",
        "cuda" or "cuda:N" (DeviceError when not usable).
    threads: onnxruntime intra-op threads; None means 1 (best for per-step latency and for
        many concurrent streams), 0 means onnxruntime's default (one per core).
    state_map, batch_axes, time_axis: only for graphs without rnnedge metadata:
        {state input: state output} pairs (default: found from naming conventions),
        {tensor name: batch axis} overrides, and the time axis of the data tensors
        (default: a dim named like time/T/seq, else none).
    check_finite: whether streams and pools refuse NaN/inf by default (docs/runtime.md).
    external_data_dir: only for bytes: the folder holding the graph's external data files.
        Without it, bytes that refer to external data are refused (ModelLoadError): they
        would otherwise be read from the process's working directory. A file's external
        data is read from the file's own folder.
    Raises ModelLoadError, ContractError, DeviceError or UsageError.
    """
    if not isinstance(path, (str, os.PathLike, bytes, bytearray)):
        raise UsageError(f"path must be a file path or the model's bytes, got {type(path).__name__}")
    if not isinstance(check_finite, bool):
        raise UsageError(f"check_finite must be True or False, got {check_finite!r}")
    in_memory = isinstance(path, (bytes, bytearray))
    source = "<bytes>" if in_memory else os.fspath(path)
    with _external_data(in_memory, external_data_dir) as config:
        try:  # called from here, so that a DeviceFallbackWarning points at the caller's load
            session, actual = create_session(bytes(path) if in_memory else path, device, threads, config)
        except ModelLoadError as exc:
            if not in_memory or "external data" not in str(exc).lower():
                raise
            raise _external_data_error(exc, external_data_dir) from None
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    contract = read_contract(meta, graph_io(session.get_inputs()), graph_io(session.get_outputs()),
                             state_map=state_map, batch_axes=batch_axes, time_axis=time_axis)
    return Model(session, contract, actual, source, check_finite)


@contextlib.contextmanager
def _external_data(in_memory: bool, folder):
    """The session config that confines a graph's external data; yields {key: folder} or None.

    onnxruntime resolves the external data of a graph given as bytes against the working
    directory (``../`` included). Naming a folder confines it there: ORT then refuses
    absolute paths and paths that leave it. Without ``folder`` a fresh empty one is named
    (removed after the load), so an external data reference fails to load instead of
    reading the caller's files. A graph file's external data stays confined to its folder.
    """
    if not in_memory:
        if folder is not None:
            raise UsageError("external_data_dir is only for a graph given as bytes; a graph file's "
                             "external data is read from the file's own folder")
        yield None
        return
    if folder is not None:
        if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
            raise UsageError(f"external_data_dir must be an existing folder, got {folder!r}")
        yield {EXTERNAL_DATA_FOLDER: os.path.abspath(folder)}
        return
    with tempfile.TemporaryDirectory(prefix="rnnedge-no-external-data-") as empty:
        yield {EXTERNAL_DATA_FOLDER: empty}


def _external_data_error(exc: ModelLoadError, folder) -> ModelLoadError:
    """The error for bytes whose external data could not be read where allowed."""
    if folder is not None:
        return ModelLoadError(f"the graph's external data is not all inside external_data_dir "
                              f"{os.fspath(folder)!r} ({first_line(exc.__cause__ or exc, 160)})")
    return ModelLoadError(
        "the graph given as bytes refers to external data files, which rnnedge does not read "
        "from the working directory: pass external_data_dir=FOLDER (the folder that holds "
        "them) to rnnedge.load, or load the .onnx file by its path")
