"""``rnnedge.bench``: per-step latency of a stateful graph, against plain onnxruntime and eager.

Engines, all fed the same pre-made inputs, each call timed on its own:

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

The weight-bandwidth floor: a step of a recurrent model at batch 1 must read every weight
once, so no engine can step faster than (weight bytes) / (memory bandwidth). The weight
bytes are the graph's float initializers (and 8-bit ones in int8-quantized graphs); the
bandwidth is that of a float32 numpy matrix-vector product over a matrix of the same byte
size, on one thread (run in a child process so that BLAS's thread count can be pinned
before it loads). Each row carries its ratio to the floor. At larger batches a step does
more arithmetic per weight, so the floor is a bound there too but a looser one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rnnedge.errors import UsageError

ENGINES = ("rnnedge", "onnxruntime", "eager", "eager-no-mkldnn")
EAGER = ("eager", "eager-no-mkldnn")
MIN_CALLS = 20  # per measurement, even when --steps / --max-time would allow fewer
ROUNDS = 10  # engines take turns in this many blocks of calls per measurement
SEED = 20261127
# Bytes per element of the initializer types that hold weights: onnx TensorProto FLOAT,
# FLOAT16, DOUBLE, BFLOAT16, and UINT8/INT8 for int8-quantized graphs. Integer types wider
# than 8 bits hold shapes and indices, not weights.
WEIGHT_TYPES = {1: 4, 10: 2, 11: 8, 16: 2, 2: 1, 3: 1}


@dataclass
class Row:
    """One measurement: ``engine`` at ``batch`` rows and ``chunk`` time steps per call.

    Latencies are percentiles of single calls, in microseconds; per step = per call /
    chunk. steps_per_s: time steps per second (each advancing all ``batch`` rows);
    samples_per_s = batch * steps_per_s. floor_ratio = p50 per step / floor.
    """

    engine: str
    device: str
    batch: int
    chunk: int
    calls: int
    p50_us_per_call: float
    p90_us_per_call: float
    p99_us_per_call: float
    p50_us_per_step: float
    p90_us_per_step: float
    p99_us_per_step: float
    mean_us_per_step: float
    steps_per_s: float
    samples_per_s: float
    floor_us_per_step: float
    floor_ratio: float


@dataclass
class Floor:
    """The weight-bandwidth floor: weight_bytes / gemv_bytes_per_s, per step."""

    weight_bytes: int
    gemv_bytes_per_s: float
    us_per_step: float


@dataclass
class BenchReport:
    """All rows of one run, with the floor and where it ran."""

    graph: str
    results: list
    floor: Floor
    settings: dict
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "graph": self.graph,
            "results": [_rounded(asdict(r)) for r in self.results],
            "floor_us_per_step": round(self.floor.us_per_step, 3),
            "floor": _rounded(asdict(self.floor)),
            "settings": dict(self.settings),
            "machine": dict(self.machine),
            "versions": dict(self.versions),
        }

    def row(self, engine: str, batch: int, chunk: int) -> Row | None:
        return next((r for r in self.results if (r.engine, r.batch, r.chunk) == (engine, batch, chunk)), None)

    def eager_comparison(self) -> list[tuple[int, int, float, float]]:
        """[(batch, chunk, eager p50, eager-no-mkldnn p50)] µs per step, where both ran."""
        out = []
        for r in self.results:
            if r.engine == "eager":
                other = self.row("eager-no-mkldnn", r.batch, r.chunk)
                if other:
                    out.append((r.batch, r.chunk, r.p50_us_per_step, other.p50_us_per_step))
        return out


def _rounded(row: dict, digits: int = 3) -> dict:
    # Timer resolution is far coarser than a nanosecond: keep the JSON readable.
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


# --- the floor ----------------------------------------------------------------------------

def weight_bytes(model) -> int:
    """Bytes of the weight initializers of ``model`` (an onnx.ModelProto): float, and 8-bit
    integer for quantized graphs. What one step must read at least once."""
    total = 0
    for init in model.graph.initializer:
        size = WEIGHT_TYPES.get(init.data_type)
        if size:
            total += size * math.prod(init.dims)
    return total


_GEMV = r"""
import json, sys, time
import numpy as np
nbytes, seconds = int(sys.argv[1]), float(sys.argv[2])
n = max(nbytes // 4, 4096)
cols = max(64, int(n ** 0.5) // 16 * 16)
rows = max(1, -(-n // cols))
rng = np.random.default_rng(0)
w = rng.standard_normal((rows, cols), dtype=np.float32)
v = rng.standard_normal(cols, dtype=np.float32)
out = np.empty(rows, np.float32)
for _ in range(20):
    np.dot(w, v, out=out)
t0 = time.perf_counter()
for _ in range(20):
    np.dot(w, v, out=out)
one = (time.perf_counter() - t0) / 20
reps = max(1, int(50e-6 / max(one, 1e-9)))  # >= 50 us per sample: the timer's cost is noise
samples = []
end = time.perf_counter() + seconds
while time.perf_counter() < end or len(samples) < 20:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        np.dot(w, v, out=out)
    samples.append((time.perf_counter_ns() - t0) / reps)
samples.sort()
# The floor is a lower bound: contention only ever slows a sample down, so the fastest
# samples (the 5th percentile, not one lucky outlier) are the machine's bandwidth.
print(json.dumps({"bytes": w.nbytes, "best_ns": samples[len(samples) // 20]}))
"""

_ONE_THREAD = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                 "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def measure_gemv(nbytes: int, seconds: float = 0.3) -> float:
    """Bytes per second of a one-thread float32 numpy GEMV over an ``nbytes`` matrix."""
    proc = subprocess.run([sys.executable, "-c", _GEMV, str(int(nbytes)), str(seconds)],
                          env={**os.environ, **_ONE_THREAD}, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the GEMV bandwidth probe failed: {last}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["bytes"] / (got["best_ns"] * 1e-9)


def measure_floor(model, seconds: float = 0.3) -> Floor:
    """The weight-bandwidth floor of ``model`` (an onnx.ModelProto) on this machine."""
    nbytes = weight_bytes(model)
    bandwidth = measure_gemv(max(nbytes, 16384), seconds)
    return Floor(nbytes, bandwidth, nbytes / bandwidth * 1e6)


# --- inputs -------------------------------------------------------------------------------

def _vocab_of(model, name: str) -> int:
    """Rows of the embedding table an int64 input indexes (1 when it cannot be told)."""
    inits = {i.name: i for i in model.graph.initializer}
    sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
             if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) >= 1
             and (n.input[1] == name)]
    if not sizes:  # indices may pass through a Cast or Reshape first: any embedding table
        sizes = [inits[n.input[0]].dims[0] for n in model.graph.node
                 if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return int(min(sizes)) if sizes else 1


def _input_shape(t: dict, batch: int, chunk: int, time_axis) -> tuple:
    shape = []
    for axis, dim in enumerate(t["shape"]):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == "batch":
            shape.append(batch)
        elif axis == time_axis:
            shape.append(chunk)
        else:
            raise UsageError(
                f"input {t['name']!r} has a dynamic axis {dim!r} that is neither batch nor time; "
                "rnnedge bench cannot choose its size"
            )
    return tuple(shape)


def make_inputs(graph, batch: int, chunk: int, count: int, plan=None) -> list[dict]:
    """``count`` seeded feeds {input name: array} for one call of ``batch`` rows, ``chunk`` steps.

    With a plan (``--against``), its own ``sample`` makes them (as the parity gate does);
    else standard-normal floats and in-range token ids from the contract.
    """
    import onnx

    meta = graph.meta
    rng = np.random.default_rng(SEED)
    time_axis = meta.get("time_axis")
    step_graph = time_axis is None
    proto = None
    feeds = []
    for _ in range(count):
        if plan is not None:
            feed = plan.sample(rng, batch, None if step_graph else chunk)
        else:
            feed = {}
            for t in graph.data_inputs:
                shape = _input_shape(t, batch, chunk, time_axis)
                if np.issubdtype(np.dtype(t["dtype"]), np.integer):
                    if proto is None:
                        proto = onnx.load_from_string(graph.data)
                    feed[t["name"]] = rng.integers(0, _vocab_of(proto, t["name"]), size=shape).astype(t["dtype"])
                else:
                    feed[t["name"]] = rng.standard_normal(shape).astype(t["dtype"])
        if graph.has_lengths:  # sequence mode: every row is the whole chunk long
            feed["lengths"] = np.full(batch, chunk, dtype=np.int64)
        feeds.append(feed)
    return feeds


# --- engines ------------------------------------------------------------------------------

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
        self.states = graph.meta["states"]
        self.names = [t["name"] for t in graph.meta["outputs"]] + [s["output"] for s in self.states]
        self.n_out = len(graph.meta["outputs"])

    def prepare(self, batch):
        session, names, n = self.session, self.names, self.n_out
        state = {s["input"]: np.zeros([batch if i == s["batch_axis"] else d for i, d in enumerate(s["shape"])],
                                      s["dtype"]) for s in self.states}
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
        from torch import nn

        self.torch = torch
        self.module = module.eval()
        self.plan = plan
        self.mkldnn = mkldnn
        self.name = "eager" if mkldnn else "eager-no-mkldnn"
        stacks, cells = (nn.RNN, nn.LSTM, nn.GRU), (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
        fast = isinstance(module, stacks + cells) and plan.lengths_input is None
        self.kind = "stack" if isinstance(module, stacks) else "cell" if isinstance(module, cells) else "reference"
        if not fast:
            self.kind = "reference"
        self.device = device if self.kind != "reference" else "cpu"
        if self.device != "cpu":
            self.module = self.module.to(self.device)

    def _zeros(self, batch):
        return {s.input: np.zeros([batch if i == s.batch_axis else d for i, d in enumerate(s.shape)], s.dtype)
                for s in self.plan.spec.states}

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


# --- timing -------------------------------------------------------------------------------

def time_calls(call, args: list, calls: int, clock=time.perf_counter_ns) -> np.ndarray:
    """Nanoseconds of each of ``calls`` calls of ``call``, cycling through ``args``."""
    times = np.empty(calls, dtype=np.int64)
    n = len(args)
    for i in range(calls):
        arg = args[i % n]
        t0 = clock()
        call(arg)
        times[i] = clock() - t0
    return times


def measure_interleaved(jobs: list, calls: int, max_seconds: float, rounds: int = ROUNDS,
                        tick: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Per job, the nanoseconds of each timed call (warm-up excluded).

    jobs: [(engine, call, args)]. The engines take turns in ``rounds`` blocks of calls,
    so that a disturbance from another process (a shared machine) falls on all of them
    alike rather than on whichever ran at that moment. An engine stops after
    ``max_seconds`` of calls (once it has MIN_CALLS). tick(round) after each round.
    """
    block = max(1, math.ceil(calls / rounds))
    warmup = max(3, min(calls // 20, 50))
    for engine, call, args in jobs:
        with engine.context():
            time_calls(call, args, warmup)
    times: list[list] = [[] for _ in jobs]
    done = [0] * len(jobs)
    spent = [0] * len(jobs)
    budget = int(max_seconds * 1e9)
    for r in range(rounds * 4):  # more rounds than planned only for engines still short of MIN_CALLS
        active = [i for i in range(len(jobs))
                  if done[i] < calls and (spent[i] < budget or done[i] < MIN_CALLS)]
        if not active:
            break
        # Rotate who goes first: the first engine of a round meets caches the previous one
        # filled, a handicap that should not always fall on the same engine.
        k = r % len(active)
        for i in active[k:] + active[:k]:
            engine, call, args = jobs[i]
            n = min(block, calls - done[i])
            with engine.context():
                got = time_calls(call, args[done[i] % len(args):] + args[:done[i] % len(args)], n)
            times[i].append(got)
            done[i] += n
            spent[i] += int(got.sum())
        if tick:
            tick(r)
    return [np.concatenate(t) if t else np.empty(0, np.int64) for t in times]


def summarize(engine: str, device: str, batch: int, chunk: int, ns: np.ndarray, floor: Floor) -> Row:
    us = ns / 1000.0
    p50, p90, p99 = (float(np.percentile(us, q)) for q in (50, 90, 99))
    mean = float(us.mean())
    steps_per_s = chunk / (mean * 1e-6) if mean > 0 else float("inf")
    per_step = p50 / chunk
    return Row(engine, device, batch, chunk, int(len(ns)), p50, p90, p99, per_step, p90 / chunk,
               p99 / chunk, mean / chunk, steps_per_s, steps_per_s * batch, floor.us_per_step,
               per_step / floor.us_per_step if floor.us_per_step > 0 else float("inf"))


# --- the run --------------------------------------------------------------------------------

def machine_info(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count()
    return {"cpu": cpu, "cores": available, "platform": platform.platform(),
            "python": platform.python_version(), "threads": threads, "device": device}


def versions() -> dict:
    import onnx
    import onnxruntime

    from rnnedge import __version__

    out = {"rnnedge": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
           "numpy": np.__version__}
    if "torch" in sys.modules:  # only report torch when the eager engines used it
        out["torch"] = sys.modules["torch"].__version__
    return out


def parse_list(text: str, what: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64] (positive ints, duplicates dropped, order kept)."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--{what} must be comma-separated positive integers (e.g. 1,8,64), got {text!r}")
        if int(part) not in values:
            values.append(int(part))
    return values


def benchmark(graph_path, *, module=None, batches=(1,), chunks=(1,), steps: int = 1000,
              threads: int = 1, device: str = "cpu", engines=None, max_seconds: float = 2.0,
              input_axes: tuple | None = None, input_dtype: str | None = None, plan=None,
              progress: Callable[[int, int, str], None] | None = None) -> BenchReport:
    """Measure the graph at ``graph_path`` per (engine, batch, chunk).

    module: the PyTorch model (nn.Module) the graph was exported from, for the eager
    engines (checked against the graph's contract; ContractError if it does not match).
    batches / chunks: rows per call and time steps per call (chunks are ignored for step
    graphs, which take one step per call: chunk is 1 there). steps: time steps fed per
    measurement (at least MIN_CALLS calls), cut short after ``max_seconds``.
    threads: intra-op threads for onnxruntime and torch (0: their defaults).
    engines: a subset of ENGINES (default: all that apply).
    plan: the module's export plan when the caller already has it (``VerifyReport.plan``):
    rebuilding it re-traces a model built around recurrent layers, which takes seconds.
    progress(done, total, label) is called as the run goes (total None while preparing).
    """
    import onnx

    from rnnedge.verify import plan_for_graph, providers_for, read_graph

    graph = read_graph(graph_path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"threads must be an int >= 0, got {threads!r}")
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps!r}")
    wanted = list(engines) if engines else [e for e in ENGINES if module is not None or e not in EAGER]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise UsageError(f"unknown engine(s) {unknown}: expected some of {', '.join(ENGINES)}")
    if module is None and any(e in EAGER for e in wanted):
        raise UsageError("the eager engines need the PyTorch model: pass --against MODEL")
    step_graph = graph.meta.get("time_axis") is None
    chunks = [1] if step_graph else list(chunks)

    if module is not None and plan is None:
        if progress:  # total None: the bar runs without a count while the plan is built
            progress(0, None, "planning the eager reference")
        plan = plan_for_graph(module, graph, None, input_axes, input_dtype)
    providers, actual = providers_for(device, graph.data)
    built: list[Engine] = []
    for name in wanted:
        if name == "rnnedge":
            # The device already resolved: "auto" must not probe (and warn) a second time.
            built.append(RnnedgeEngine(graph.path, actual, threads))
        elif name == "onnxruntime":
            built.append(OrtEngine(graph, providers, actual, threads))
        else:
            eager_device = "cuda" if actual.startswith("cuda") and _torch_cuda() else "cpu"
            if name == "eager-no-mkldnn" and eager_device != "cpu":
                continue  # oneDNN is a CPU library: the setting changes nothing on a GPU
            built.append(EagerEngine(module, plan, name == "eager", eager_device))

    if progress:
        progress(0, None, "measuring the GEMV bandwidth (floor)")
    floor = measure_floor(onnx.load_from_string(graph.data))
    with torch_threads(threads, any(isinstance(e, EagerEngine) for e in built)):
        rows = _measure(graph, built, batches, chunks, steps, max_seconds, plan, floor, progress)
    settings = {"batches": list(batches), "chunks": chunks, "steps": steps, "threads": threads,
                "device": actual, "max_seconds": max_seconds, "step_graph": step_graph,
                "mode": graph.meta.get("mode")}
    return BenchReport(str(graph.path), rows, floor, settings, machine_info(threads, actual), versions())


def _measure(graph, built, batches, chunks, steps, max_seconds, plan, floor, progress) -> list:
    """Rows for every (batch, chunk), the engines interleaved within each."""
    step_graph = graph.meta.get("time_axis") is None
    groups = [(batch, chunk) for batch in batches for chunk in chunks]
    total = len(groups) * ROUNDS
    rows = []
    for g, (batch, chunk) in enumerate(groups):
        feeds = make_inputs(graph, batch, chunk, 8, plan)
        calls = max(MIN_CALLS, math.ceil(steps / chunk))
        jobs = [(e, e.prepare(batch), [e.convert(f) for f in feeds]) for e in built]
        label = f"batch {batch}" + ("" if step_graph else f", chunk {chunk}")
        if progress:
            progress(g * ROUNDS, total, label)
        tick = (lambda r, g=g, label=label: progress(g * ROUNDS + min(r + 1, ROUNDS), total, label)) \
            if progress else None
        for (engine, _, _), ns in zip(jobs, measure_interleaved(jobs, calls, max_seconds, tick=tick)):
            rows.append(summarize(engine.name, engine.device, batch, chunk, ns, floor))
    if progress:
        progress(total, total, "done")
    return rows


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- output -------------------------------------------------------------------------------

def write_json(report: BenchReport, path) -> Path:
    from rnnedge.atomic import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(report.as_dict(), indent=2) + "\n").encode())


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or UsageError (exit 2) when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'rnnedge[plot]' "
            "(or leave out --plot)"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(report: BenchReport, path) -> Path:
    """Latency per step (p50, log scale) against chunk size, one line per engine, per batch."""
    plt = require_matplotlib()
    batches = sorted({r.batch for r in report.results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    engines = [e for e in ENGINES if any(r.engine == e for r in report.results)]
    for ax, batch in zip(axes[0], batches):
        for engine in engines:
            rows = sorted((r for r in report.results if r.engine == engine and r.batch == batch),
                          key=lambda r: r.chunk)
            ax.plot([r.chunk for r in rows], [r.p50_us_per_step for r in rows], marker="o", label=engine)
        ax.axhline(report.floor.us_per_step, linestyle="--", color="gray", label="weight-bandwidth floor")
        ax.set_xscale("log", base=2)
        chunks = sorted({r.chunk for r in report.results})
        ax.set_xticks(chunks, [str(c) for c in chunks])  # the chunk sizes measured, not powers of 2
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("chunk (time steps per call)")
        ax.set_ylabel("p50 latency per step (µs)")
        ax.set_title(f"{Path(report.graph).name}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
