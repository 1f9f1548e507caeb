"""Typed errors. Every error rnnedge raises on purpose is an ``RnnedgeError``.

``exit_code`` is what the CLI exits with: 2 for a usage error (the caller asked for
something malformed or impossible), 1 for a failed export, verification or run.
Messages are one line: what was expected, what was found, what to do.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = 200, fallback: str | None = None) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` characters, for one-line errors.

    An empty message gives ``fallback`` (the exception's type name by default).
    """
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else (type(exc).__name__ if fallback is None else fallback)
    return text if limit is None else text[:limit]


class RnnedgeError(Exception):
    """Base of all rnnedge errors."""

    exit_code = 1


class UsageError(RnnedgeError):
    """Bad arguments or inputs from the caller (CLI exit code 2)."""

    exit_code = 2


class ModelLoadError(UsageError):
    """A model file could not be found, read or matched to its architecture."""


class UnsupportedModelError(RnnedgeError):
    """The model (or one of its layers) cannot be exported in the requested mode."""


class ExportError(RnnedgeError):
    """The export itself failed (tracing, translation, graph checking, writing)."""


class ParityError(ExportError):
    """The exported graph does not equal eager PyTorch within tolerance."""

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = list(failures or [])


class ContractError(RnnedgeError):
    """An ONNX graph's rnnedge contract (metadata or state pairing) is missing or invalid."""


class StepInputError(UsageError, ValueError):
    """An input given to a stream does not match the graph's contract."""


class DeviceError(RnnedgeError):
    """The requested execution provider / device is not usable."""


class NonFiniteError(StepInputError):
    """A step met NaN or inf (in an input, an output or the new state) and was undone.

    ``names`` lists the tensors that held them. The state is exactly as before the step.
    Streams and pools check float tensors by default (``check_finite=False`` opts out),
    because onnxruntime's CPU recurrent kernels turn a NaN into plausible finite numbers.
    """

    def __init__(self, message: str, names: list | None = None):
        super().__init__(message)
        self.names = list(names or [])


class ConcurrentUseError(RnnedgeError):
    """A Stream or Pool was used from a second thread while a call on it was in progress."""
