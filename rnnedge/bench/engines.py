"""The engines a bench run measures, all fed the same pre-made inputs, each call timed on its own:

* ``rnnedge``: the runtime's ``Stream.step`` (bound buffers, state ping-pong).
* ``onnxruntime``: a plain ``InferenceSession.run`` loop, the state carried as numpy
  arrays from one call's outputs to the next call's feeds: what one writes by hand.
* ``eager`` / ``eager-no-mkldnn``: the PyTorch model stepped chunk by chunk with its state
  carried, with torch's defaults and with ``torch.backends.mkldnn.enabled = False``
  (oneDNN's RNN kernels carry a large fixed cost per call, so at small batch and
  chunk they can be far slower than the plain ones; both are shown).

Eager stepping: a bare nn.RNN/LSTM/GRU is called as ``module(x_chunk, hx)`` and a cell as
``cell(x, hx)`` on tensors made before timing; any other model goes through the export
plan's ``reference`` function (numpy in, numpy out, state dict in and out), which adds a
few microseconds of conversion per call on top of the model's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

ENGINES = ("rnnedge", "onnxruntime", "eager", "eager-no-mkldnn")
EAGER = ("eager", "eager-no-mkldnn")


class Engine:
    """prepare(batch) -> call(arg) with a fresh zero state; convert(feed) -> arg, untimed."""

    name = ""
    device = "cpu"

    def prepare(self, batch: int) -> Callable:
        raise NotImplementedError

    def convert(self, feed: dict):
        return feed

    def context(self):
        return contextlib.nullcontext()


class RnnedgeEngine(Engine):
    name = "rnnedge"

    def __init__(self, path, device: str, threads: int):
        from rnnedge.runtime import load

        self.model = load(path, device=device, threads=threads)
        self.device = self.model.device
        self._single = len(self.model.input_names) == 1

    def prepare(self, batch):
        return self.model.stream(batch).step

    def convert(self, feed):
        return next(iter(feed.values())) if self._single else feed


class OrtEngine(Engine):
    """A plain session.run loop: states fed as numpy arrays, read back from the outputs."""

    name = "onnxruntime"

    def __init__(self, graph, providers: list, device: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(graph.data, opts, providers=providers)
        self.device = device
        self.spec = graph.contract
        self.names = [t.name for t in self.spec.outputs] + [s.output for s in self.spec.states]
        self.n_out = len(self.spec.outputs)

    def prepare(self, batch):
        session, names, n = self.session, self.names, self.n_out
        state = self.spec.zero_states(batch)
        keys = list(state)

        def call(feed):
            values = session.run(names, {**feed, **state})
            for key, value in zip(keys, values[n:]):
                state[key] = value
            return values[:n]

        return call


class EagerEngine(Engine):
    """The PyTorch model stepped with its state carried (see the module docstring)."""

    def __init__(self, module, plan, mkldnn: bool, device: str = "cpu"):
        import torch

        from rnnedge.recurrent import CELLS, STACKS

        self.torch = torch
        self.module = module.eval()
        self.plan = plan
        self.mkldnn = mkldnn
        self.name = "eager" if mkldnn else "eager-no-mkldnn"
        stacks, cells = STACKS, CELLS
        fast = isinstance(module, stacks + cells) and plan.lengths_input is None
        self.kind = "stack" if isinstance(module, stacks) else "cell" if isinstance(module, cells) else "reference"
        if not fast:
            self.kind = "reference"
        self.device = device if self.kind != "reference" else "cpu"
        if self.device != "cpu":
            self.module = self.module.to(self.device)

    def _zeros(self, batch):
        return self.plan.spec.zero_states(batch)

    def convert(self, feed):
        if self.kind == "reference":
            return feed
        return self.torch.from_numpy(next(iter(feed.values()))).to(self.device)

    def prepare(self, batch):
        torch, module = self.torch, self.module
        zeros = self._zeros(batch)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else None
        if self.kind == "reference":
            reference = self.plan.reference
            state = dict(zeros)

            def call(feed):
                nonlocal state
                out, state = reference(feed, state)
                return out

            return call
        hx = [torch.from_numpy(z).to(self.device) for z in zeros.values()]
        hx = tuple(hx) if len(hx) > 1 else hx[0]
        stack = self.kind == "stack"

        def call(x):
            nonlocal hx
            if stack:
                y, hx = module(x, hx)
            else:
                hx = module(x, hx)
                y = hx
            if sync:
                sync()
            return y

        return call

    @contextlib.contextmanager
    def context(self):
        # Only cheap switches here (entered once per block of calls); the thread count is
        # set once for the whole run by ``torch_threads``: changing it rebuilds torch's pool.
        torch = self.torch
        mkldnn = torch.backends.mkldnn.enabled
        try:
            # Set directly: torch.backends.mkldnn.flags() also sets a TF32 flag that warns.
            torch.backends.mkldnn.enabled = self.mkldnn
            with torch.inference_mode():
                yield
        finally:
            torch.backends.mkldnn.enabled = mkldnn


@contextlib.contextmanager
def torch_threads(threads: int, active: bool):
    """torch's intra-op thread count set to ``threads`` (0: left alone) for the block."""
    if not active or threads == 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
