"""What a stream or pool refuses besides malformed inputs: NaN/inf, and a second thread.

NaN/inf: onnxruntime's CPU LSTM/GRU kernels turn a NaN input into plausible finite
outputs and a finite state (eager PyTorch gives NaN), so a stream would carry on from a
poisoned state without a sign. Float tensors are checked with one dot product each (the
sum x.1: one BLAS pass, no temporary, and no overflow short of float's range; NaN/inf
make it non-finite), about a microsecond per tensor at the sizes a step has; only a
non-finite result pays for the exact test.

Threads: a Stream or Pool holds a non-blocking lock for the length of each call. A
second thread calling meanwhile gets ConcurrentUseError at once: never a lost step,
never a wait (a wait would hide the misuse and serialize the app's threads).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from rnnedge.errors import ConcurrentUseError, NonFiniteError

BUSY = ("{what} is already in a call from another thread; give each thread its own "
        "stream or pool (they may share the Model)")
OPT_OUT = "pass check_finite=False to rnnedge.load or to stream()/pool() to let NaN/inf through"


def probe(a: np.ndarray) -> tuple:
    """(a flat view of ``a``, ones like it): what ``finite`` takes, made once per buffer.

    The view sees every later write into ``a`` (``a`` must be contiguous: a bound buffer).
    """
    v = a.reshape(-1)
    return v, np.ones_like(v)


def finite(view: np.ndarray, ones: np.ndarray) -> bool:
    """Whether ``view`` (from ``probe``) holds no NaN or inf.

    A sum overflowing from finite values (near float's largest) is a false alarm, which
    the exact test then clears.
    """
    return math.isfinite(view.dot(ones)) or bool(np.isfinite(view).all())


def all_finite(a: np.ndarray) -> bool:
    """Whether the float array ``a`` (any shape) holds no NaN or inf (off the hot path)."""
    return bool(np.isfinite(a).all())


def where_nonfinite(a: np.ndarray) -> str:
    """'3 of 12 values, the first at (0, 1, 2)': where ``a`` holds NaN/inf (for messages)."""
    bad = ~np.isfinite(a)
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else ()
    return f"{int(bad.sum())} of {a.size} values, the first at {first}"


def refuse_nonfinite_inputs(data: tuple, arrays: list, where: str, rows: str = "") -> None:
    """NonFiniteError if a float data input (``data``: TensorInfos) holds NaN/inf.

    rows: appended to the tensor's name in the message (a pool names its streams).
    """
    bad = [(t.name, a) for t, a in zip(data, arrays) if a.dtype.kind == "f" and not all_finite(a)]
    if bad:
        name, a = bad[0]
        raise NonFiniteError(
            f"{where}: input {name!r}{rows} holds NaN or inf ({where_nonfinite(a)}); nothing "
            f"was run and the state is unchanged: clean the input, or {OPT_OUT}",
            [n for n, _ in bad])


def refuse_nonfinite_state(values: dict, where: str) -> None:
    """NonFiniteError if a float state about to be set ({name: array}) holds NaN/inf."""
    bad = [n for n, v in values.items() if v.dtype.kind == "f" and not all_finite(v)]
    if bad:
        raise NonFiniteError(
            f"{where}: state {bad[0]!r} holds NaN or inf ({where_nonfinite(values[bad[0]])}); "
            f"nothing was changed: set a finite state, or {OPT_OUT}", bad)


def nonfinite_result(where: str, names: list, rows: str = "") -> NonFiniteError:
    """The error for a run that made NaN/inf from finite inputs (the caller undid the run)."""
    return NonFiniteError(
        f"{where}: the graph produced NaN or inf in {names}{rows} from finite inputs; the step "
        "was undone and the state is unchanged: check the state set and the model's weights, "
        f"or {OPT_OUT}", list(names))


def exclusive(what: str):
    """Decorate a method of an object with a ``_busy`` Lock: refuse it while another call runs."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if not self._busy.acquire(False):
                raise ConcurrentUseError(BUSY.format(what=what))
            try:
                return method(self, *args, **kwargs)
            finally:
                self._busy.release()
        return guarded
    return wrap


def busy(what: str) -> ConcurrentUseError:
    """The error for a call made while another thread's call is in progress."""
    return ConcurrentUseError(BUSY.format(what=what))
