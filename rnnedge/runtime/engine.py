"""The hot path: one session, a fixed batch, ping-pong state buffers and cached bindings.

Each state has two preallocated buffers, A and B. Two IOBindings per input shape read
the state from one buffer and write it to the other (A->B, B->A), so a step only
copies the data input into a bound buffer and runs: nothing is rebound and, on CUDA,
the state never leaves the device. Data inputs live in host buffers bound once per shape
(onnxruntime copies them to the device inside the run); on CUDA the data outputs stay in
device buffers until they are read.

An Engine is used by one thread at a time (IOBinding objects are not thread-safe);
the session itself is shared.

A run never touches the buffer set the state was read from, so ``undo`` (flip the
parity back) restores the state before the last run bit for bit: that is how a step
whose outputs or new state hold NaN/inf is refused without a copy.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnxruntime as ort

from rnnedge.errors import UsageError
from rnnedge.runtime.guards import all_finite, finite, probe
from rnnedge.runtime.providers import on_device, parse_device

MAX_SLOTS = 16  # distinct input shapes kept bound per engine (LRU beyond that)
# Most bytes of state one engine allocates (two buffer sets counted): sizes come from the
# graph's metadata and the caller's batch, so a tampered file or a typo must give an
# error before numpy or CUDA try to allocate terabytes.
MAX_STATE_BYTES = 16 << 30


def check_state_size(states: tuple, batch: int, where: str) -> None:
    """Refuse (UsageError) states whose two buffer sets for ``batch`` rows exceed MAX_STATE_BYTES.

    Sizes are multiplied as Python ints, so nothing overflows however large the file says.
    """
    total = 0
    for s in states:
        count = 1
        for dim in s.shape_for(batch):
            count *= int(dim)
        total += 2 * count * np.dtype(s.dtype).itemsize
        if total > MAX_STATE_BYTES:
            raise UsageError(
                f"{where}: state {s.input!r} of shape {list(s.shape_for(batch))} "
                f"({np.dtype(s.dtype).name}) takes the states to {total / 2**30:.3g} GiB (two "
                f"buffers each), over the {MAX_STATE_BYTES >> 30} GiB a stream or pool "
                "allocates; use a smaller batch, or check the graph's metadata (a tampered size?)")


class Slot:
    """The bindings for one tuple of input shapes.

    in_bufs: host arrays the data inputs are copied into, one per data input.
    out_bufs: where the data outputs land (None until the first run found their shapes):
    host arrays on the CPU, device OrtValues on CUDA (read with Engine.host_outputs). args[p]: what the session runs when the current state is in buffer set p.
    """

    __slots__ = ("key", "in_bufs", "out_bufs", "bindings", "args", "float_in", "after")

    def __init__(self, key, in_bufs, bindings, args):
        self.key = key
        self.in_bufs = in_bufs
        # The finite checks' (view, ones) of the float data inputs, and after[p]: the
        # (name, view, ones) of the float outputs and states a run leaves when the state
        # lands in buffer set p (CPU only: set by the first run; empty on CUDA).
        self.float_in = [probe(b) for b in in_bufs if b.dtype.kind == "f"]
        self.after = ((), ())
        self.out_bufs = None
        self.bindings = bindings
        self.args = args


class Engine:
    """Runs ``session`` for ``batch`` rows, carrying the state between runs.

    model: the Model (session, device, contract). data: the TensorInfos of the data
    inputs this engine is fed, in order. constants: {input name: OrtValue} bound as is.
    """

    def __init__(self, model, batch: int, data: tuple, constants: dict):
        self.session = model.session
        self.batch = batch
        self.data = data
        self.constants = constants
        self.states = model.contract.states
        self.outputs = model.contract.outputs
        self.on_cuda = model.device.startswith("cuda")
        self.device_id = parse_device(model.device)[1]
        raw = getattr(self.session, "_sess", None)
        # The public wrapper adds WebGPU capture bookkeeping to every run; the pybind
        # session runs the same binding without it (about 1 us a step).
        self._raw = raw is not None and hasattr(raw, "run_with_iobinding")
        self._run = raw.run_with_iobinding if self._raw else self.session.run_with_iobinding
        self.parity = 0
        self.host = None  # CPU: the numpy arrays behind the state OrtValues, [set][state]
        self.bufs = [[], []]  # [set][state] OrtValue
        shapes = [s.shape_for(batch) for s in self.states]
        try:
            if self.on_cuda:
                for side in (0, 1):
                    self.bufs[side] = [
                        on_device(s.zeros(batch), model.device) for s in self.states]
            else:
                self.host = [[s.zeros(batch) for s in self.states]
                             for _ in (0, 1)]
                self.bufs = [[ort.OrtValue.ortvalue_from_numpy(a) for a in side] for side in self.host]
        except MemoryError:  # under MAX_STATE_BYTES (checked by Stream/Pool), yet too much here
            raise UsageError(f"the state for batch {batch} does not fit in memory "
                             f"({[list(x) for x in shapes]}); use a smaller batch") from None
        self._slots: OrderedDict = OrderedDict()

    # --- stepping ---------------------------------------------------------------------------

    def slot(self, key: tuple) -> Slot:
        """The bindings for input shapes ``key`` (a tuple of shapes, one per data input)."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        in_bufs = [np.empty(shape, t.dtype) for t, shape in zip(self.data, key)]
        in_vals = [ort.OrtValue.ortvalue_from_numpy(a) for a in in_bufs]
        bindings = []
        for side in (0, 1):
            io = self.session.io_binding()
            for t, value in zip(self.data, in_vals):
                io.bind_ortvalue_input(t.name, value)
            for name, value in self.constants.items():
                io.bind_ortvalue_input(name, value)
            for s, value in zip(self.states, self.bufs[side]):
                io.bind_ortvalue_input(s.input, value)
            for t in self.outputs:  # placeholders; the first run learns their shapes
                io.bind_output(t.name, "cpu")
            for s, value in zip(self.states, self.bufs[1 - side]):
                io.bind_ortvalue_output(s.output, value)
            bindings.append(io)
        args = [io._iobinding if self._raw else io for io in bindings]
        slot = Slot(key, in_bufs, bindings, args)
        self._slots[key] = slot
        if len(self._slots) > MAX_SLOTS:
            self._slots.popitem(last=False)
        return slot

    def forget(self, key: tuple) -> None:
        """Drop the bindings for input shapes ``key``: for a call whose output shapes differ
        from other calls' of the same input shapes (a look-ahead graph's first and last)."""
        self._slots.pop(key, None)

    def run(self, slot: Slot) -> None:
        """One run over the data already in ``slot.in_bufs``; the state advances only on success."""
        if slot.out_bufs is None:
            self._first_run(slot)
        else:
            self._run(slot.args[self.parity], None)
        self.parity ^= 1

    def _first_run(self, slot: Slot) -> None:
        io = slot.bindings[self.parity]
        self._run(slot.args[self.parity], None)
        got = io.get_outputs()[: len(self.outputs)]
        if self.on_cuda:
            # Outputs stay on the device too: they reach the host only when read.
            out_bufs = [ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), t.dtype.type, "cuda", self.device_id)
                        for t, v in zip(self.outputs, got)]
            values = out_bufs
        else:
            out_bufs = [np.array(v.numpy(), copy=True) for v in got]
            values = [ort.OrtValue.ortvalue_from_numpy(buf) for buf in out_bufs]
            outs = [(t.name, *probe(b)) for t, b in zip(self.outputs, out_bufs) if b.dtype.kind == "f"]
            slot.after = tuple(
                tuple(outs + [(s.output, *probe(a)) for s, a in zip(self.states, side) if a.dtype.kind == "f"])
                for side in self.host)
        for t, value in zip(self.outputs, values):
            for other in slot.bindings:
                other.bind_ortvalue_output(t.name, value)
        slot.out_bufs = out_bufs

    def undo(self) -> None:
        """Return to the state before the last run (its input buffers were not written)."""
        self.parity ^= 1

    def nonfinite_after_run(self, slot: Slot, outputs: list | None = None) -> list[str]:
        """Names of the last run's float outputs and new states holding NaN/inf.

        CPU: every output and state, read in place. CUDA: they stay on the device, and
        reading them back each step would cost a copy and a sync, so only the outputs are
        checked, in ``outputs`` (their host copies from ``host_outputs``, read anyway), and
        nothing without them."""
        if self.on_cuda:
            return [t.name for t, v in zip(self.outputs, outputs or ())
                    if v.dtype.kind == "f" and not all_finite(v)]
        return [name for name, v, ones in slot.after[self.parity] if not finite(v, ones)]

    def host_outputs(self, slot: Slot) -> list:
        """New host arrays of the last run's outputs (from the device on CUDA)."""
        if self.on_cuda:
            return [v.numpy() for v in slot.out_bufs]
        return [b.copy() for b in slot.out_bufs]

    # --- state --------------------------------------------------------------------------------

    def current(self) -> list:
        """The OrtValues holding the state now, one per state."""
        return self.bufs[self.parity]

    def get_state(self) -> dict:
        """{state input name: host copy}."""
        if self.host is not None:
            return {s.input: a.copy() for s, a in zip(self.states, self.host[self.parity])}
        return {s.input: np.array(v.numpy(), copy=True) for s, v in zip(self.states, self.bufs[self.parity])}

    def get_one(self, index: int) -> np.ndarray:
        """A read-only view (CPU) or host copy (CUDA) of state ``index``; valid until the next run."""
        if self.host is not None:
            return self.host[self.parity][index]
        return self.bufs[self.parity][index].numpy()

    def set_state(self, values: dict) -> None:
        """Overwrite states from {state input name: array of the exact shape and dtype}."""
        for i, s in enumerate(self.states):
            if s.input not in values:
                continue
            if self.host is not None:
                np.copyto(self.host[self.parity][i], values[s.input])
            else:
                self.bufs[self.parity][i].update_inplace(np.ascontiguousarray(values[s.input]))

    def zero_rows(self, rows) -> None:
        """Reset the state of ``rows`` (a boolean mask or index array, or None for all)."""
        for i, s in enumerate(self.states):
            if rows is None or s.batch_axis is None:
                if self.host is not None:
                    self.host[self.parity][i].fill(0)
                else:
                    self.bufs[self.parity][i].update_inplace(s.zeros(self.batch))
                continue
            index = (slice(None),) * s.batch_axis + (rows,)
            if self.host is not None:
                self.host[self.parity][i][index] = 0
            else:
                arr = np.array(self.bufs[self.parity][i].numpy(), copy=True)
                arr[index] = 0
                self.bufs[self.parity][i].update_inplace(arr)
