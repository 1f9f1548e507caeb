"""The run: ``benchmark()`` builds the engines, measures the floor and every (batch, chunk)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rnnedge.bench.engines import (
    EAGER,
    ENGINES,
    EagerEngine,
    Engine,
    OrtEngine,
    RnnedgeEngine,
    torch_threads,
)
from rnnedge.bench.floor import measure_floor
from rnnedge.bench.inputs import _input_shape, make_inputs
from rnnedge.bench.report import BenchReport
from rnnedge.bench.timing import MIN_CALLS, ROUNDS, measure_interleaved, summarize
from rnnedge.errors import UsageError
from rnnedge.limits import MAX_STEPS, check_count, check_shape


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

    from rnnedge.exporters.verify import plan_for_graph, providers_for, read_graph

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
    check_count("steps", steps, MAX_STEPS)
    for b, c, t in ((b, c, t) for b in batches for c in chunks for t in graph.contract.data_inputs):
        # Before any feed is made: --batch 10^12 is a usage error, not terabytes requested.
        check_shape(f"a call's input at batch {b}, chunk {c}",
                    _input_shape(t, b, c, graph.contract.time_axis))

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
