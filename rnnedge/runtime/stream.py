"""A Stream: one batch of sequences fed step by step (or chunk by chunk), state carried."""

from __future__ import annotations

import threading
from math import isfinite

import numpy as np

from rnnedge.contract import FLUSH_STATE
from rnnedge.errors import StepInputError, UsageError
from rnnedge.runtime import remainder
from rnnedge.runtime.engine import Engine, check_state_size
from rnnedge.runtime.guards import (
    busy,
    exclusive,
    nonfinite_result,
    refuse_nonfinite_inputs,
    refuse_nonfinite_state,
)
from rnnedge.runtime.inputs import as_list, check, check_lengths, check_state, lengths_of

STREAM = "this stream"


class Stream:
    """Feeds ``batch`` independent sequences through the graph, carrying the state.

    Made by ``Model.stream``. One stream is for one thread at a time: a call while another
    thread's call on the same stream is in progress raises ConcurrentUseError (never
    loses a step); make one stream per thread (they can share the Model).

    With ``check_finite`` (the default) a step refuses NaN/inf in its float inputs, and on
    the CPU in its outputs and new state, with NonFiniteError and the state unchanged; on
    CUDA outputs are checked when read, and the state (on the device) is not.
    """

    def __init__(self, model, batch: int, data: tuple, constants: dict, check_finite: bool = True):
        self.model = model
        self.batch = batch
        self.check_finite = bool(check_finite)
        self._data = data
        check_state_size(model.contract.states, batch, f"stream(batch={batch})")
        self._engine = Engine(model, batch, data, constants)
        self._single = len(data) == 1
        self._dtype = data[0].dtype if self._single else None
        self._out_names = [t.name for t in model.contract.outputs]
        self._single_out = len(self._out_names) == 1
        self._slot = None  # the bindings of the last step's input shapes
        # Sequence mode's per-row lengths are values to check on every call, not just shapes.
        self._lengths = lengths_of(model.contract, data)
        self._readable = None  # the slot whose outputs the last successful call left
        self._busy = threading.Lock()  # held by the call in progress; never waited on
        # Strided graphs (contract chunk_multiple): steps short of a multiple, held back.
        spec = model.contract.spec
        self._multiple = spec.chunk_multiple if spec is not None else 1
        # Look-ahead graphs (contract latency): the first call needs more than latency steps.
        self._latency = spec.latency if spec is not None else 0
        # Strided graphs whose first call is off the grid (contract chunk_offset).
        self._offset = spec.chunk_offset if spec is not None else 0
        self._end = spec.model_end if spec is not None else None  # a flush pads to it
        # Strided graphs with either: the flush call pads to the grid, and its outputs are cut
        # so the stream's add up to ceil(real steps * time_ratio): counted per stream.
        self._tally = (self._multiple > 1 and bool(self._latency or self._offset)) or \
            (spec is not None and any(t.end_offset is not None for t in spec.outputs))
        self._ratios = [t.time_ratio for t in spec.outputs] if self._tally else []
        self._ends = [t.end_offset for t in spec.outputs] if self._tally else []
        self._fed, self._emitted = 0, [0] * len(self._out_names)
        self._started = False
        self._held = None

    @property
    def input_names(self) -> list[str]:
        """The data inputs ``step`` takes (graph inputs bound as constants excluded)."""
        return [t.name for t in self._data]

    def step(self, x, read: bool = True):
        """Run one call (one step, or one chunk along the time axis) and carry the state.

        x: for a single data input an array shaped as the graph input with this stream's
        batch (e.g. (batch, time, F) or, for step graphs, (batch, F)); for several data
        inputs a dict {name: array}. Returns the data output as a new array, or for
        several outputs a dict {name: array}. With ``read=False`` returns None and leaves
        the outputs where they are (on the device with CUDA) until ``read()``: for steps
        whose outputs the app does not need. Raises StepInputError (state untouched)
        when ``x`` does not match the contract, NonFiniteError (a StepInputError; state
        untouched) for NaN/inf, ConcurrentUseError when another thread is in a call.
        """
        if not self._busy.acquire(False):  # inline, not @exclusive: the per-step hot path
            raise busy(STREAM)
        try:
            return self._step_held(x, read) if self._holding else self._step(x, read)
        finally:
            self._busy.release()

    __call__ = step

    def _step(self, x, read: bool):
        """``step`` with this stream's lock held (``run`` calls it once per chunk)."""
        slot = self._slot
        if self._single and type(x) is np.ndarray:
            if slot is None or x.shape != slot.key[0] or x.dtype != self._dtype:
                slot = self._prepare([x])
            slot.in_bufs[0][...] = x  # faster than np.copyto for small arrays
        else:
            arrays = as_list(self._data, x, "step()")
            if slot is None or any(
                    type(a) is not np.ndarray or a.shape != k or a.dtype != t.dtype
                    for a, k, t in zip(arrays, slot.key, self._data)):
                slot = self._prepare(arrays)
            if self._lengths is not None:  # after the shape/dtype checks: arrays are sound
                at, timed, axis = self._lengths
                check_lengths(arrays[at], arrays[timed].shape[axis], "step()")
            for buf, a in zip(slot.in_bufs, arrays):
                buf[...] = a
        check_finite = self.check_finite
        if check_finite:  # the bound buffers: native, contiguous, whatever x was
            for v, ones in slot.float_in:  # guards.finite, inlined: the hot path
                if not isfinite(v.dot(ones)):
                    refuse_nonfinite_inputs(self._data, slot.in_bufs, "step()")
        engine = self._engine
        try:
            if slot.out_bufs is None:
                engine.run(slot)
            else:  # Engine.run inlined: this is the per-step hot path
                parity = engine.parity
                engine._run(slot.args[parity], None)
                engine.parity = parity ^ 1
        except BaseException:
            self._readable = None  # the outputs may be half written
            raise
        if check_finite:
            for _, v, ones in slot.after[engine.parity]:
                if not isfinite(v.dot(ones)):
                    bad = engine.nonfinite_after_run(slot)  # the exact test, which names them
                    if bad:
                        engine.undo()
                        self._readable = None
                        raise nonfinite_result("step()", bad)
                    break
        self._readable = slot
        if not read:
            return None
        if self._single_out and not engine.on_cuda:
            return slot.out_bufs[0].copy()
        values = engine.host_outputs(slot)
        if self.check_finite and engine.on_cuda:  # on the host now: the check is cheap
            bad = engine.nonfinite_after_run(slot, values)
            if bad:
                engine.undo()
                self._readable = None
                raise nonfinite_result("step()", bad)
        return self._as_y(values)

    def _as_x(self, arrays: list):
        """Data input arrays, in contract order, as ``step`` takes them."""
        return arrays[0] if self._single else dict(zip(self.input_names, arrays))

    def _as_y(self, values: list):
        """Output arrays, in contract order, as ``step`` returns them."""
        return values[0] if self._single_out else dict(zip(self._out_names, values))

    @property
    def _started(self) -> bool:
        """Whether a look-ahead graph's first call has run (its first frames are out)."""
        return self._started_flag

    @_started.setter
    def _started(self, value: bool) -> None:
        # step() reads one plain attribute per call, not this predicate: the hot path.
        self._started_flag = value
        self._holding = self._multiple > 1 or (self._latency > 0 and (self._tally or not value))

    def _step_held(self, x, read: bool):
        """``_step`` for graphs whose chunks are multiples of ``chunk_multiple`` steps: feeds
        the largest multiple of held + new steps, holds the rest (``remainder``); for graphs
        with ``latency``, holds a stream's first steps until there are more than latency;
        with both (or ``chunk_offset``), the first call is the largest T1 = chunk_offset
        (mod chunk_multiple) over latency, the later ones multiples."""
        multiple, first = self._multiple, not self._started
        if multiple == 1 and not first:  # a look-ahead graph after its first call
            out = self._step(x, read)
            if self._tally:  # outputs with an end_offset: the flush cuts to what is due
                steps = [a.shape[t.time_axis] for t, a in zip(self._data, as_list(
                    self._data, x, "step()")) if t.time_axis is not None]
                self._fed += steps[0]
                self._count(self._readable.out_bufs)
            return out
        arrays = [check(t, a, self.batch, "step()") for t, a in
                  zip(self._data, as_list(self._data, x, "step()"))]
        axes = [t.time_axis for t in self._data]
        if multiple == 1:
            feed, keep = remainder.first(arrays, axes, self._held, self._latency)
        elif first:
            feed, keep = remainder.split(arrays, axes, self._held, multiple, self._offset,
                                         self._latency)
        else:
            feed, keep = remainder.split(arrays, axes, self._held, multiple)
        if feed is None:
            self._held = keep
            return self._empty() if read else None
        if first and (self._latency or self._offset):
            out = self._step_once(feed, read)
        else:
            out = self._step(self._as_x(feed), read)
        self._held = keep  # after the call: a failed call holds what it held before
        self._started = True
        if self._tally:
            self._fed += remainder.held_steps(feed, axes)
            self._count(self._readable.out_bufs)
        return out

    def _count(self, values: list) -> list:
        """Add the steps of ``values`` (the outputs, in contract order) to ``_emitted``."""
        for i, (v, t) in enumerate(zip(values, self.model.contract.outputs)):
            if t.time_axis is not None:
                self._emitted[i] += remainder.frames(v, t.time_axis)
        return values

    def _step_once(self, feed: list, read: bool):
        """``_step`` on fresh bindings, dropped after: a look-ahead graph's first call and its
        flush give fewer/more output steps than other calls of the same input shapes."""
        key = tuple(a.shape for a in feed)
        self._engine.forget(key)
        self._slot = None
        try:
            return self._step(self._as_x(feed), read)
        finally:
            self._engine.forget(key)
            self._slot = None

    def _empty(self):
        values = [remainder.empty(t.shape, t.dtype, t.time_axis, self.batch)
                  for t in self.model.contract.outputs]
        return self._as_y(values)

    @property
    def held(self) -> int:
        """Time steps held back for the next call (graphs with ``chunk_multiple`` > 1)."""
        return remainder.held_steps(self._held, [t.time_axis for t in self._data])

    @exclusive(STREAM)
    def flush(self):
        """End of stream: the outputs still to come, as ``step`` returns them (zero steps
        when there are none). Joined to the outputs before it, this equals eager PyTorch on
        the whole input, frame for frame.

        Strided graphs (``chunk_multiple``): the held steps zero-padded to the multiple,
        the real steps' outputs returned. Look-ahead graphs (``latency``): one call of the
        held steps padded to the grid (a multiple; before the first call, the smallest
        first call) and latency rounded up to it in zeros, the flush state set to those;
        outputs cut to what the steps fed are due (time_ratio, end_offset). The state is
        then past the stream's end: ``reset()`` before the next stream."""
        axes = [t.time_axis for t in self._data]
        if self._latency or self._offset:
            return self._flush_late(axes)
        real = remainder.held_steps(self._held, axes)
        if real == 0:
            return self._empty()
        feed = remainder.padded(self._held, axes, self._multiple)
        out = self._step(self._as_x(feed), True)
        self._held = None
        outs = [out] if self._single_out else [out[n] for n in self._out_names]
        outs = [remainder.trim(v, t.time_axis, real, self._multiple)
                for v, t in zip(outs, self.model.contract.outputs)]
        return self._as_y(outs)

    def _flush_late(self, axes: list):
        real = remainder.held_steps(self._held, axes)
        pad, past = remainder.flush_call(self._fed + real, real, self._started, self._multiple,
                                         self._offset, self._latency, self._end)
        if (not self._started and real == 0) or real + pad == 0:
            # Nothing to feed: the graph would emit 0 steps, which onnxruntime's CPU
            # GRU/LSTM kernels abort the process on.
            return self._empty()
        held = self._held or [remainder.take_none(t, self.batch) for t in self._data]
        feed = remainder.extended(held, axes, pad)
        saved = self._engine.get_state()
        if self._latency:  # graphs with only a chunk_offset have no flush state (past: 0)
            self._engine.set_state({FLUSH_STATE: np.full_like(saved[FLUSH_STATE], past)})
        try:
            out = self._step_once(feed, True)
        except BaseException:
            self._engine.set_state(saved)
            raise
        self._held = None
        self._started = True
        if not self._tally:
            return out
        # The graph emits the grid padding's frames too: cut to what the real steps are due.
        self._fed += real
        outs = [out] if self._single_out else [out[n] for n in self._out_names]
        axes = [t.time_axis for t in self.model.contract.outputs]
        return self._as_y(self._count(remainder.cut_due(outs, axes, self._ratios, self._emitted,
                                                        self._fed, self._ends)))

    @exclusive(STREAM)
    def read(self):
        """The last call's outputs as new host arrays (array, or dict for several).

        Not checked for NaN/inf on CUDA (a step with ``read=False`` left them unchecked).
        """
        if self._readable is None:
            raise UsageError("read(): no outputs to read: no step has run, or the last one failed")
        return self._as_y(self._engine.host_outputs(self._readable))

    def _prepare(self, arrays: list):
        arrays = [check(t, a, self.batch, "step()") for t, a in zip(self._data, arrays)]
        slot = self._engine.slot(tuple(a.shape for a in arrays))
        self._slot = slot
        return slot

    @exclusive(STREAM)
    def run(self, x, chunk: int = 1):
        """Feed a long input along the time axis in chunks of ``chunk`` steps.

        x: as for ``step`` but with any number of time steps (>= 1). Returns the outputs
        of every chunk concatenated along the time axis, as ``step`` returns them (with
        ``chunk_multiple`` > 1, steps short of a multiple are held for the next call or
        ``flush()``). Equals
        one call over the whole input when the graph streams. Only for graphs with a time
        axis in mode "stream" (UsageError otherwise). On any error the state is as before.
        """
        contract = self.model.contract
        if contract.mode != "stream":
            raise UsageError("run() streams in chunks, but this graph is mode 'sequence' (one "
                             "whole sequence per call, e.g. bidirectional): call step() instead")
        untimed = [t.name for t in self._data + contract.outputs if t.time_axis is None]
        if untimed:
            raise UsageError(f"run() needs a time axis, but {untimed} have none (a step graph "
                             "takes one step per call): call step() once per step")
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise UsageError(f"chunk must be an int >= 1, got {chunk!r}")
        arrays = [check(t, a, self.batch, "run()") for t, a in
                  zip(self._data, as_list(self._data, x, "run()"))]
        lengths = {a.shape[t.time_axis] for a, t in zip(arrays, self._data)}
        if len(lengths) != 1:
            raise StepInputError(f"run(): the data inputs have different time lengths {sorted(lengths)}")
        total = lengths.pop()
        saved, held, started = self._engine.get_state(), self._held, self._started
        counts = self._fed, list(self._emitted)
        step = self._step_held if self._multiple > 1 or self._latency else self._step
        pieces: list[list] = [[] for _ in contract.outputs]
        try:
            for start in range(0, total, chunk):
                feed = {t.name: a[(slice(None),) * t.time_axis + (slice(start, start + chunk),)]
                        for t, a in zip(self._data, arrays)}
                y = step(feed, True)
                outs = [y] if self._single_out else [y[n] for n in self._out_names]
                for piece, out in zip(pieces, outs):
                    piece.append(out)
        except BaseException:
            self._engine.set_state(saved)
            self._held, self._started = held, started
            self._fed, self._emitted = counts
            raise
        joined = [np.concatenate(piece, axis=t.time_axis) for piece, t in zip(pieces, contract.outputs)]
        return self._as_y(joined)

    @exclusive(STREAM)
    def reset(self, mask=None) -> None:
        """Zero the state of every row, or of the rows where ``mask`` (bool, (batch,)) is True."""
        if mask is None:
            self._engine.zero_rows(None)
            self._held = None
            self._started = False
            self._fed, self._emitted = 0, [0] * len(self._out_names)
            return
        if self._latency or self._offset:
            what = (f"streams {self._latency} steps late (contract latency)" if self._latency
                    else f"takes a first call of {self._offset} (mod {self._multiple}) steps "
                         "(contract chunk_offset)")
            raise UsageError(f"reset(mask): this graph {what}, counting a stream's first "
                             "frames for all rows alike; call reset() for all rows")
        if self.held:
            raise UsageError(f"reset(mask): this stream holds {self.held} steps back for the "
                             "next call (chunk_multiple), for all rows alike; flush() first or "
                             "call reset() for all rows")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (self.batch,):
            raise UsageError(f"reset(mask): mask must be a bool array of shape ({self.batch},), got "
                             f"{mask.dtype.name}{list(mask.shape)}")
        unbatched = [s.input for s in self.model.contract.states if s.batch_axis is None]
        if unbatched:
            raise UsageError(f"reset(mask): states {unbatched} have no batch axis, so rows cannot be "
                             "reset one by one; call reset() for all rows")
        self._engine.zero_rows(mask)

    @property
    @exclusive(STREAM)
    def state(self) -> dict:
        """A copy of the state: {state input name: array shaped as the state for this batch}."""
        return self._engine.get_state()

    @state.setter
    @exclusive(STREAM)
    def state(self, values: dict) -> None:
        # All checked before any is written, so a bad assignment changes nothing.
        values = check_state(self.model.contract.states, self.batch, values, "state")
        if self.check_finite:
            refuse_nonfinite_state(values, "state")
        self._engine.set_state(values)
