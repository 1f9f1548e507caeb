"""A Pool: many independent single-row streams stepped together as one batched call.

Each stream owns one row of a host-side store (one array per state, batch axis =
capacity). A step gathers the rows of the streams it is given into an Engine of that
batch size and runs once. While the same streams step in the same order, their rows
simply stay in the engine (on the device for CUDA): rows are scattered back and gathered
anew only when the set or order of streams in a step changes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from rnnedge.errors import ContractError, StepInputError, UsageError
from rnnedge.runtime.engine import Engine, check_state_size
from rnnedge.runtime.guards import (
    all_finite,
    busy,
    exclusive,
    finite,
    nonfinite_result,
    refuse_nonfinite_inputs,
    refuse_nonfinite_state,
)
from rnnedge.runtime.inputs import as_list, check, check_lengths, check_state, lengths_of
from rnnedge.runtime.providers import on_device

MAX_ENGINES = 8  # batch sizes kept allocated
POOL = "this pool"


def bad_rows(a: np.ndarray, axis: int, ids: tuple) -> list:
    """The ids (one per index along ``axis``) whose slice of ``a`` holds NaN/inf."""
    rows = np.moveaxis(np.asarray(a), axis, 0).reshape(len(ids), -1)
    return [sid for sid, ok in zip(ids, np.isfinite(rows).all(axis=1)) if not ok]


class Pool:
    """Steps many streams (each one row, batch 1) in one batched call; made by ``Model.pool``.

    One pool is for one thread at a time: a call while another thread's call on the same
    pool is in progress raises ConcurrentUseError. NaN/inf are refused as by a Stream
    (``check_finite``), for the whole call: no stream in it advances.

    Inputs the contract marks constant that have a batch axis (e.g. an attention
    decoder's memory (batch, 50, 512)) are constant per stream: each stream gives its own
    row once, ``add(constants={name: array with batch 1}``), and ``step`` does not take them.
    """

    def __init__(self, model, data: tuple, constants: dict, check_finite: bool = True):
        contract = model.contract
        # Per-stream constants: bound from engine-owned buffers, filled when streams gather.
        self._per_stream = tuple(t for t in data if t.constant and t.batch_axis is not None)
        data = tuple(t for t in data if t not in self._per_stream)
        self._const_rows: dict[int, list] = {}  # stream id -> [row per per-stream constant]
        unbatched = [t.name for t in data + contract.outputs if t.batch_axis is None] + \
                    [s.input for s in contract.states if s.batch_axis is None]
        if unbatched:
            raise ContractError(f"a pool batches streams along the batch axis, but {unbatched} "
                                "have none; pass batch_axes= to rnnedge.load, or use streams")
        spec = contract.spec
        if spec is not None and (spec.latency or spec.chunk_offset):
            late = f"streams {spec.latency} steps late (contract latency: look-ahead " \
                   "convolutions)" if spec.latency else ""
            off = f"takes a first call of {spec.chunk_offset} (mod {spec.chunk_multiple}) " \
                  "steps (contract chunk_offset)" if spec.chunk_offset else ""
            raise UsageError(f"a pool steps streams without holding their first steps back, but "
                             f"this graph {' and '.join(w for w in (late, off) if w)}; use one "
                             "model.stream() per stream")
        # Strided graphs: a chunk that is not a multiple would be silently wrong, so refused.
        self._multiple = spec.chunk_multiple if spec is not None else 1
        check_state_size(contract.states, 1, "pool()")
        self.model = model
        self.check_finite = bool(check_finite)
        self._busy = threading.Lock()  # held by the call in progress; never waited on
        self._data = data
        self._constants = constants
        self._states = contract.states
        self._outputs = contract.outputs
        self._out_names = [t.name for t in contract.outputs]
        self._single_out = len(self._out_names) == 1
        self._capacity = 0
        self._store = [s.zeros(0) for s in self._states]
        self._row: dict[int, int] = {}  # stream id -> row in the store
        self._free: list[int] = []
        self._next_id = 0
        self._engines: OrderedDict = OrderedDict()  # batch size -> (Engine, constant buffers)
        self._resident: tuple = ()  # ids whose rows live in the engine, in batch order
        self._shapes = None  # per-stream input shapes of the last checked step
        self._lengths = lengths_of(contract, data)  # sequence mode: values checked per step
        self._engine = None

    # --- membership -------------------------------------------------------------------------

    @exclusive(POOL)
    def add(self, state: dict | None = None, constants: dict | None = None) -> int:
        """A new stream (zero state, or ``state`` as for one row); returns its id.

        constants: {name: array with batch 1} for every per-stream constant of the graph
        (see the class); required when it has any, refused otherwise.
        """
        rows = self._stream_constants(constants)
        if state is not None:
            state = check_state(self._states, 1, state, "add(state)")
            if self.check_finite:
                refuse_nonfinite_state(state, "add(state)")
        if not self._free:
            self._grow()
        sid = self._next_id
        self._next_id += 1
        row = self._free.pop()
        self._row[sid] = row
        self._const_rows[sid] = rows
        for s, store in zip(self._states, self._store):
            self._rows_view(s, store, row)[...] = 0 if state is None or s.input not in state else state[s.input]
        return sid

    @exclusive(POOL)
    def remove(self, sid: int) -> None:
        """Forget stream ``sid``; its row is reused by a later ``add``."""
        row = self._lookup(sid)
        if sid in self._resident:
            self._evict()
        del self._row[sid]
        self._const_rows.pop(sid, None)
        self._free.append(row)

    @exclusive(POOL)
    def reset(self, sid: int) -> None:
        """Zero the state of stream ``sid``."""
        row = self._lookup(sid)
        if sid in self._resident:
            mask = np.array([r == sid for r in self._resident])
            self._engine.zero_rows(mask)
        else:
            for s, store in zip(self._states, self._store):
                self._rows_view(s, store, row)[...] = 0

    @exclusive(POOL)
    def get_state(self, sid: int) -> dict:
        """A copy of stream ``sid``'s state: {state input name: array with batch 1}."""
        row = self._lookup(sid)
        if sid in self._resident:  # read it where it lives, so the next step need not regather
            pos = self._resident.index(sid)
            return {s.input: self._rows_view(s, self._engine.get_one(i), pos).copy()
                    for i, s in enumerate(self._states)}
        return {s.input: self._rows_view(s, store, row).copy() for s, store in zip(self._states, self._store)}

    @exclusive(POOL)
    def set_state(self, sid: int, values: dict) -> None:
        """Overwrite stream ``sid``'s state (arrays with batch 1, checked exactly)."""
        row = self._lookup(sid)
        values = check_state(self._states, 1, values, "set_state()")
        if self.check_finite:
            refuse_nonfinite_state(values, "set_state()")
        if sid in self._resident:
            self._evict()
        for s, store in zip(self._states, self._store):
            if s.input in values:
                self._rows_view(s, store, row)[...] = values[s.input]

    @property
    def ids(self) -> list[int]:
        """The ids of the streams in the pool."""
        return list(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, sid) -> bool:
        return sid in self._row

    # --- stepping -----------------------------------------------------------------------------

    def step(self, inputs: dict) -> dict:
        """Step the streams in ``inputs`` ({id: x}) as one batch; returns {id: y}.

        x and y are as for a batch-1 ``Stream.step``: an array, or a dict by name for several
        inputs/outputs. Every x in one call must have the same shape (same chunk length).
        Streams not in ``inputs`` keep their state. Raises StepInputError (no state changed)
        for a bad x or unknown id, NonFiniteError (no state changed) for NaN/inf,
        ConcurrentUseError when another thread is in a call on this pool.
        """
        if not self._busy.acquire(False):  # inline, not @exclusive: the per-step hot path
            raise busy(POOL)
        try:
            return self._step(inputs)
        finally:
            self._busy.release()

    def _step(self, inputs: dict) -> dict:
        if not isinstance(inputs, dict) or not inputs:
            raise StepInputError(f"pool.step() takes a non-empty dict {{stream id: input}}, got {inputs!r:.60}")
        ids = tuple(inputs)
        columns = self._checked(ids, inputs)
        if ids != self._resident:
            self._evict()
            self._gather(ids)
        engine = self._engine
        n = len(ids)
        key = tuple(col[0].shape[:t.batch_axis] + (n,) + col[0].shape[t.batch_axis + 1:]
                    for col, t in zip(columns, self._data))
        slot = engine.slot(key)
        for t, buf, col in zip(self._data, slot.in_bufs, columns):
            np.concatenate(col, axis=t.batch_axis, out=buf)
        check = self.check_finite
        if check and not all(finite(v, ones) for v, ones in slot.float_in):
            rows = sorted({sid for t, buf in zip(self._data, slot.in_bufs) if t.dtype.kind == "f"
                           for sid in bad_rows(buf, t.batch_axis, ids)})
            refuse_nonfinite_inputs(self._data, slot.in_bufs, "pool.step()", f" of streams {rows}")
        engine.run(slot)
        outputs = engine.host_outputs(slot)
        bad = engine.nonfinite_after_run(slot, outputs) if check else []
        if bad:
            rows = self._bad_streams(slot, outputs, ids)
            engine.undo()
            raise nonfinite_result("pool.step()", bad, f" of streams {rows}")
        results = []
        for t, buf in zip(self._outputs, outputs):
            # One copy for all streams, each getting a disjoint batch-1 view: the batch axis
            # moved to the front and a size-1 axis left in its place, split by list().
            ax = t.batch_axis
            results.append(list(np.moveaxis(np.expand_dims(buf, ax + 1), ax, 0)))
        if self._single_out:
            return dict(zip(ids, results[0]))
        return {sid: {name: res[j] for name, res in zip(self._out_names, results)}
                for j, sid in enumerate(ids)}

    def _checked(self, ids: tuple, inputs: dict) -> list:
        """[[array per stream] per data input], every one checked; raises StepInputError.

        Arrays that look like the last step's (type, dtype, shape) pass on cheap compares;
        others get the full check, and all must share the first stream's shapes.
        """
        data, rows = self._data, self._row
        ref = self._shapes
        columns: list[list] = [[] for _ in data]
        if len(data) == 1 and ref is not None:  # the common case, kept tight
            col, dtype, shape = columns[0], data[0].dtype, ref[0]
            for sid in ids:
                x = inputs[sid]
                if sid not in rows or type(x) is not np.ndarray or x.dtype != dtype or x.shape != shape:
                    break
                col.append(x)
            else:
                return columns
            columns = [[] for _ in data]
        for k, sid in enumerate(ids):
            if sid not in rows:
                raise StepInputError(f"pool.step(): unknown stream id {sid!r}; the pool has {self.ids}")
            x = inputs[sid]
            arrays = [x] if len(data) == 1 and type(x) is np.ndarray else \
                as_list(data, x, f"pool.step() stream {sid}")
            if ref is None or any(type(a) is not np.ndarray or a.dtype != t.dtype or a.shape != shape
                                  for a, t, shape in zip(arrays, data, ref)):
                arrays = [check(t, a, 1, f"pool.step() stream {sid}") for t, a in zip(data, arrays)]
                shapes = tuple(a.shape for a in arrays)
                if k and shapes != ref:
                    raise StepInputError(
                        f"pool.step(): stream {sid} gives shapes {list(shapes)}, stream {ids[0]} "
                        f"{list(ref)}: all streams in one step need the same shapes")
                self._check_multiple(sid, arrays)
                ref = shapes
            if self._lengths is not None:
                at, timed, axis = self._lengths
                check_lengths(arrays[at], np.shape(arrays[timed])[axis], f"pool.step() stream {sid}")
            for col, a in zip(columns, arrays):
                col.append(a)
        self._shapes = ref
        return columns

    def _check_multiple(self, sid, arrays: list) -> None:
        """StepInputError for a chunk that is not a multiple of ``chunk_multiple`` steps (a
        pool holds no remainder back: ``Stream.step`` does)."""
        if self._multiple == 1:
            return
        for t, a in zip(self._data, arrays):
            if t.time_axis is not None and a.shape[t.time_axis] % self._multiple:
                raise StepInputError(
                    f"pool.step() stream {sid}: {t.name} has {a.shape[t.time_axis]} time steps, "
                    f"but this graph takes multiples of {self._multiple} (contract chunk_multiple:"
                    " strided convolutions); feed multiples, or use model.stream(), which holds "
                    "the rest back")

    def _bad_streams(self, slot, outputs: list, ids: tuple) -> list:
        """The ids whose rows of the last run's outputs or new state hold NaN/inf (for messages)."""
        found = set()
        for t, v in zip(self._outputs, outputs):
            if v.dtype.kind == "f":
                found.update(bad_rows(v, t.batch_axis, ids))
        for i, s in enumerate(self._states):
            if np.dtype(s.dtype).kind == "f":
                found.update(bad_rows(self._engine.get_one(i), s.batch_axis, ids))
        return sorted(found)

    # --- rows ---------------------------------------------------------------------------------

    def _lookup(self, sid) -> int:
        row = self._row.get(sid)
        if row is None:
            raise UsageError(f"no stream with id {sid!r} in this pool")
        return row

    @staticmethod
    def _rows_view(s, store, rows):
        """The row(s) ``rows`` (an int or a slice) of a store array along the state's batch axis."""
        if isinstance(rows, (int, np.integer)):
            rows = slice(rows, rows + 1)
        return store[(slice(None),) * s.batch_axis + (rows,)]

    def _grow(self) -> None:
        old = self._capacity
        check_state_size(self._states, max(8, old * 2), f"pool.add() (stream {len(self._row) + 1})")
        self._capacity = max(8, old * 2)
        grown = []
        for s, store in zip(self._states, self._store):
            new = s.zeros(self._capacity)
            self._rows_view(s, new, slice(0, old))[...] = store
            grown.append(new)
        self._store = grown
        self._free.extend(range(self._capacity - 1, old - 1, -1))

    def _stream_constants(self, constants) -> list:
        """The checked rows (batch 1) of a new stream's per-stream constants, in order."""
        names = [t.name for t in self._per_stream]
        if not names:
            if constants:
                raise UsageError(f"add(constants=...): this graph has no per-stream constant; "
                                 f"it takes {[t.name for t in self._data]} with every step")
            return []
        if not isinstance(constants, dict) or sorted(constants) != sorted(names):
            got = sorted(constants) if isinstance(constants, dict) else type(constants).__name__
            raise UsageError(f"add(): each stream of this pool needs its constants {names} "
                             f"(arrays with batch 1): pass add(constants={{...}}), got {got}")
        rows = [np.ascontiguousarray(check(t, constants[t.name], 1, "add(constants)")).copy()
                for t in self._per_stream]
        if self.check_finite and not all(all_finite(a) for a in rows if a.dtype.kind == "f"):
            refuse_nonfinite_inputs(self._per_stream, rows, "add(constants)")
        return rows

    def _engine_for(self, batch: int) -> tuple[Engine, list]:
        """(the engine for ``batch`` rows, its per-stream constant buffers [(host, OrtValue)])."""
        entry = self._engines.get(batch)
        if entry is None:
            bufs = []
            for t in self._per_stream:
                host = np.zeros([batch if i == t.batch_axis else d for i, d in enumerate(t.shape)], t.dtype)
                bufs.append((host, on_device(host, self.model.device)))  # CPU: shares host
            bound = {**self._constants, **{t.name: v for t, (_, v) in zip(self._per_stream, bufs)}}
            entry = (Engine(self.model, batch, self._data, bound), bufs)
            self._engines[batch] = entry
            if len(self._engines) > MAX_ENGINES:
                self._engines.popitem(last=False)
        self._engines.move_to_end(batch)
        return entry

    def _gather(self, ids: tuple) -> None:
        rows = np.array([self._row[sid] for sid in ids])
        engine, bufs = self._engine_for(len(ids))
        engine.set_state({s.input: np.take(store, rows, axis=s.batch_axis)
                          for s, store in zip(self._states, self._store)})
        for k, (t, (host, value)) in enumerate(zip(self._per_stream, bufs)):
            joined = np.concatenate([self._const_rows[sid][k] for sid in ids], axis=t.batch_axis)
            if engine.on_cuda:
                value.update_inplace(joined)
            else:
                host[...] = joined
        self._engine = engine
        self._resident = ids

    def _evict(self) -> None:
        """Write the resident rows back to the store; afterwards no stream is resident."""
        if not self._resident:
            return
        rows = np.array([self._row[sid] for sid in self._resident])
        for i, (s, store) in enumerate(zip(self._states, self._store)):
            store[(slice(None),) * s.batch_axis + (rows,)] = self._engine.get_one(i)
        self._resident = ()
        self._engine = None
