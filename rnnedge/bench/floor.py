"""The weight-bandwidth floor of a graph on this machine.

The weight-bandwidth floor: a step of a recurrent model at batch 1 must read every weight
once, so no engine can step faster than (weight bytes) / (memory bandwidth). The weight
bytes are the graph's float initializers (and 8-bit ones in int8-quantized graphs); the
bandwidth is that of a float32 numpy matrix-vector product over a matrix of the same byte
size, on one thread (run in a child process so that BLAS's thread count can be pinned
before it loads). Each row carries its ratio to the floor. At larger batches a step does
more arithmetic per weight, so the floor is a bound there too but a looser one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from rnnedge.bench.report import Floor

# Bytes per element of the initializer types that hold weights: onnx TensorProto FLOAT,
# FLOAT16, DOUBLE, BFLOAT16, and UINT8/INT8 for int8-quantized graphs. Integer types wider
# than 8 bits hold shapes and indices, not weights.
WEIGHT_TYPES = {1: 4, 10: 2, 11: 8, 16: 2, 2: 1, 3: 1}


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
