"""``rnnedge.bench``: per-step latency of a stateful graph, against plain onnxruntime and eager.

One module per concern:

* ``engines``: the engines measured (rnnedge, plain onnxruntime, eager PyTorch) and how
  the eager one steps a model.
* ``inputs``: the seeded feeds every engine of a measurement is given.
* ``timing``: single calls timed, the engines interleaved in rounds, percentiles.
* ``floor``: the weight-bandwidth floor (weight bytes / one-thread GEMV bandwidth).
* ``report``: the Row, Floor and BenchReport dataclasses and their JSON.
* ``run``: ``benchmark()``, the whole run, with the machine and versions it ran on.
* ``plotting``: ``--plot`` (needs matplotlib).
"""

from rnnedge.bench.engines import (
    EAGER,
    ENGINES,
    EagerEngine,
    Engine,
    OrtEngine,
    RnnedgeEngine,
    torch_threads,
)
from rnnedge.bench.floor import WEIGHT_TYPES, measure_floor, measure_gemv, weight_bytes
from rnnedge.bench.inputs import SEED, make_inputs
from rnnedge.bench.plotting import plot, require_matplotlib
from rnnedge.bench.report import BenchReport, Floor, Row, write_json
from rnnedge.bench.run import benchmark, machine_info, parse_list, versions
from rnnedge.bench.timing import (
    MIN_CALLS,
    ROUNDS,
    measure_interleaved,
    summarize,
    time_calls,
)

__all__ = [
    "EAGER",
    "ENGINES",
    "MIN_CALLS",
    "ROUNDS",
    "SEED",
    "WEIGHT_TYPES",
    "BenchReport",
    "EagerEngine",
    "Engine",
    "Floor",
    "OrtEngine",
    "RnnedgeEngine",
    "Row",
    "benchmark",
    "machine_info",
    "make_inputs",
    "measure_floor",
    "measure_gemv",
    "measure_interleaved",
    "parse_list",
    "plot",
    "require_matplotlib",
    "summarize",
    "time_calls",
    "torch_threads",
    "versions",
    "weight_bytes",
    "write_json",
]
