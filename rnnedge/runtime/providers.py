"""Execution providers: which device a session runs on, and making the session.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even where it cannot
run (no GPU, or CUDA/cuDNN libraries missing); it only finds out when a session is
made, and then logs a multi-line error and silently falls back to the CPU. So usability
is judged from ``session.get_providers()`` of a real session made with ORT's logging
silenced, the answer is cached per device for the process, and the outcome is one
DeviceError (``device="cuda"``) or one DeviceFallbackWarning (``device="auto"``).
"""

from __future__ import annotations

import os
import threading
import warnings

import onnxruntime as ort

from rnnedge.errors import DeviceError, ModelLoadError, UsageError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
# ORT's own default; there is no getter for the current level, so the probe restores this.
ORT_DEFAULT_LOG_SEVERITY = 2
ORT_SILENT = 4

_lock = threading.Lock()
_cuda_usable: dict[int, bool] = {}  # device id -> usable, once probed

UNUSABLE = ("onnxruntime's CUDA execution provider is not usable here (no GPU, or the CUDA/"
            "cuDNN libraries this onnxruntime-gpu build needs are missing)")


class DeviceFallbackWarning(RuntimeWarning):
    """``device="auto"`` wanted CUDA but runs on the CPU."""


def parse_device(device: str) -> tuple[str, int]:
    """("auto" | "cpu" | "cuda", device id) from "auto", "cpu", "cuda" or "cuda:N"."""
    if isinstance(device, str):
        name, _, index = device.strip().lower().partition(":")
        if name in ("auto", "cpu") and not index:
            return name, 0
        if name == "cuda" and (not index or index.isdigit()):
            return name, int(index or 0)
    raise UsageError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def on_device(array, device: str) -> ort.OrtValue:
    """An OrtValue of ``array`` where ``device`` ("cpu", "cuda", "cuda:N") runs: on the CPU
    one sharing ``array``'s memory, on CUDA a copy on device N."""
    kind, index = parse_device(device)
    if kind == "cuda":
        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", index)
    return ort.OrtValue.ortvalue_from_numpy(array)


# onnxruntime's config key: the folder an in-memory graph's external data is read from.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def session_options(threads: int | None, config: dict | None = None) -> ort.SessionOptions:
    """Options for a step-wise session: ``threads`` intra-op threads (None: 1, 0: ORT's default),
    plus ``config`` {key: value} session config entries."""
    if threads is None:
        threads = 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"threads must be None or an int >= 0, got {threads!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # recurrent graphs are a chain: nothing to run in parallel
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


def _session(source, opts, providers) -> ort.InferenceSession:
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ModelLoadError(f"no ONNX file at {os.fspath(source)!r}")
    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the graph: {first}") from exc


def _probe(source, opts, device_id: int) -> ort.InferenceSession:
    """A session asking for CUDA, made with ORT's log silenced; records whether CUDA took."""
    ort.set_default_logger_severity(ORT_SILENT)
    try:
        sess = _session(source, opts, [(CUDA_EP, {"device_id": device_id}), CPU_EP])
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)
    _cuda_usable[device_id] = CUDA_EP in sess.get_providers()
    return sess


def cuda_usable(device_id: int = 0) -> bool | None:
    """Whether CUDA was found usable by an earlier load (None: not probed yet)."""
    if CUDA_EP not in ort.get_available_providers():
        return False
    return _cuda_usable.get(device_id)


def create_session(source, device: str, threads: int | None,
                   config: dict | None = None) -> tuple[ort.InferenceSession, str]:
    """(session, "cpu" or "cuda:N") for ``source`` (a path or serialized model bytes);
    ``config``: session config entries (e.g. EXTERNAL_DATA_FOLDER)."""
    kind, device_id = parse_device(device)
    opts = session_options(threads, config)
    if kind == "cpu":
        return _session(source, opts, [CPU_EP]), "cpu"

    if CUDA_EP not in ort.get_available_providers():
        if kind == "cuda":
            raise DeviceError(
                "device='cuda' needs onnxruntime-gpu, but this onnxruntime build has no CUDA "
                f"execution provider (it has {ort.get_available_providers()}); install "
                "onnxruntime-gpu, or use device='cpu'")
        # A CPU-only onnxruntime is a normal install, not a fallback: no warning.
        return _session(source, opts, [CPU_EP]), "cpu"

    with _lock:  # the probe changes ORT's global log level
        usable = _cuda_usable.get(device_id)
        sess = None
        if usable is None:
            sess = _probe(source, opts, device_id)
            usable = _cuda_usable[device_id]
    if usable:
        if sess is None:
            sess = _session(source, opts, [(CUDA_EP, {"device_id": device_id}), CPU_EP])
        if CUDA_EP in sess.get_providers():
            return sess, f"cuda:{device_id}"
    if kind == "cuda":
        raise DeviceError(f"device='{device}': {UNUSABLE}; use device='cpu' or 'auto'")
    warnings.warn(f"rnnedge: device='auto': {UNUSABLE}; running on CPU (pass device='cpu' "
                  "to silence this)", DeviceFallbackWarning, stacklevel=3)
    if sess is None or CUDA_EP in sess.get_providers():
        sess = _session(source, opts, [CPU_EP])
    return sess, "cpu"
