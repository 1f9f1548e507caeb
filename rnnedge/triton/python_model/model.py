"""Triton Python-backend model hosting the rnnedge runtime (written by rnnedge; see docs/deploy.md).

Every sequence's recurrent state lives here, in an ``rnnedge`` Pool keyed by Triton's
correlation ID; it never crosses the network. Triton's sequence batcher (``oldest``)
hands ``execute`` the requests of up to max_batch_size sequences; requests with equal
shapes run as one batched ``Pool.step``.

Wire tensors are batch-first: each request carries one row, data input ``x`` as
``(1, *dims)`` where dims are the graph's shape without its batch axis; the graph's own
layout (e.g. time-major) is restored here, and outputs go back batch-first.

Control inputs (set by Triton from the request's sequence flags): START resets (or
creates) the sequence's state, END frees it after the step, CORRID names it. A sequence
idle past ``max_sequence_idle_microseconds`` is dropped by Triton; its state is freed
here at the next ``execute``. A request of a sequence this instance has no state for
(never started, freed, or the server restarted) is an error, never a silent zero state.
"""

import json
import os
import sys
import time

# isort: off
# First: rnnedge serve's copy of this module puts the server environment (numpy < 2) on sys.path.
import triton_python_backend_utils as pb_utils
import numpy as np
# isort: on

CONTROLS = ("START", "END", "CORRID")


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        extra = _param(config, "RNNEDGE_PATH")
        if extra and extra not in sys.path:  # rnnedge's source when it is not installed
            sys.path.insert(0, extra)
        from rnnedge.runtime import load

        folder = os.path.join(args["model_repository"], args["model_version"])
        threads = int(_param(config, "RNNEDGE_THREADS", "1"))
        self.model = load(os.path.join(folder, "model.onnx"), device="cpu", threads=threads)
        self.pool = self.model.pool()
        self.inputs = self.model.contract.inputs
        self.outputs = self.model.contract.outputs
        idle_us = config.get("sequence_batching", {}).get("max_sequence_idle_microseconds")
        self.idle_s = int(idle_us) / 1e6 if idle_us else 1e9
        self.streams = {}  # correlation ID -> pool stream id
        self.last = {}  # correlation ID -> time.monotonic() of its last request

    # --- requests -----------------------------------------------------------------------------

    def _control(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"request has no {name} control input; send it with a sequence_id")
        return tensor.as_numpy().reshape(-1)[0]

    def _data(self, request):
        """{input name: array in the graph's layout, batch 1}; ValueError on a request that
        is not one batch-first row (dtype and shape are Pool.step's to check, in the
        contract's words)."""
        arrays = {}
        for t in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is None:
                raise ValueError(f"request has no input {t.name!r}")
            x = tensor.as_numpy()
            if x.ndim <= t.batch_axis or x.shape[0] != 1:
                raise ValueError(
                    f"input {t.name!r}: expected shape (1, {', '.join(map(str, self._dims(t)))}) "
                    f"(one row per request), got {tuple(x.shape)}")
            arrays[t.name] = np.ascontiguousarray(np.moveaxis(x, 0, t.batch_axis))
        return arrays

    @staticmethod
    def _dims(t):
        return [d if isinstance(d, int) else -1 for i, d in enumerate(t.shape) if i != t.batch_axis]

    def _expire(self, now):
        for corrid in [c for c, t in self.last.items() if now - t > self.idle_s]:
            self._free(corrid)

    def _free(self, corrid):
        sid = self.streams.pop(corrid, None)
        self.last.pop(corrid, None)
        if sid is not None:
            self.pool.remove(sid)

    # --- execute ------------------------------------------------------------------------------

    def execute(self, requests):
        now = time.monotonic()
        self._expire(now)
        responses = [None] * len(requests)
        batches = []  # [{"key": shapes, "items": [(i, corrid, sid, x, end)]}]
        for i, request in enumerate(requests):
            corrid, start, end = None, False, False
            try:
                corrid = int(self._control(request, "CORRID"))
                start = bool(self._control(request, "START"))
                end = bool(self._control(request, "END"))
                x = self._data(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                if corrid is not None and (start or end):
                    self._free(corrid)  # a failed START must not leave an older state to continue
                responses[i] = self._error(exc)
                continue
            if start:
                if corrid in self.streams:
                    self.pool.reset(self.streams[corrid])
                else:
                    self.streams[corrid] = self.pool.add()
            elif corrid not in self.streams:
                responses[i] = self._error(
                    f"sequence {corrid} has no state on this server (never started, ended, idle "
                    f"past {self.idle_s:g} s, or the server restarted); start it again with "
                    "sequence_start=True")
                continue
            self.last[corrid] = now
            sid = self.streams[corrid]
            # Dtype too: a request Pool.step refuses must not take others in its batch down.
            key = tuple((a.shape, a.dtype.str) for a in x.values())
            batch = next((b for b in batches if b["key"] == key
                          and all(item[2] != sid for item in b["items"])), None)
            if batch is None:
                batch = {"key": key, "items": []}
                batches.append(batch)
            batch["items"].append((i, corrid, sid, x, end))
        for batch in batches:
            self._run(batch["items"], responses)
        return responses

    def _run(self, items, responses):
        single = len(self.inputs) == 1
        name = self.inputs[0].name
        feed = {sid: (x[name] if single else x) for _, _, sid, x, _ in items}
        try:
            results = self.pool.step(feed)
        except Exception as exc:  # noqa: BLE001 - e.g. NaN/inf: no state changed, all told
            results = None
            error = exc
        for i, corrid, sid, _, end in items:
            if results is None:
                responses[i] = self._error(error)
            else:
                y = results[sid]
                if not isinstance(y, dict):
                    y = {self.outputs[0].name: y}
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(t.name, np.ascontiguousarray(np.moveaxis(y[t.name], t.batch_axis, 0)))
                    for t in self.outputs])
            if end:
                self._free(corrid)

    @staticmethod
    def _error(exc):
        text = " ".join(str(exc).split()) or type(exc).__name__
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(text))

    def finalize(self):
        self.streams.clear()
        self.last.clear()
