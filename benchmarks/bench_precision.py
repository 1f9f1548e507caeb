"""File size and per-step latency of int8 / fp16 graphs against float32, on the CPU.

    python benchmarks/bench_precision.py [--calls 2000] [--max-time 3] [--repeats 3] [--json FILE]

Models (random weights, seeded: size and latency do not depend on what was learned):

  lstm   nn.LSTM(64, 256, num_layers=2, batch_first=True)
  gru    nn.GRU(64, 256, batch_first=True), and nn.GRU(64, 512, batch_first=True) to show
         where an int8 GRU's fixed per-step cost (its Scan and gate nodes) stops mattering

Each is exported with ``rnnedge.export`` at precision fp32, int8 and fp16 (each gated),
then stepped one step per call at batch 1 through the rnnedge runtime on one thread
(``rnnedge.load(path, device="cpu", threads=1).stream(1).step``), the precisions taking
turns so that a noisy neighbour hits all alike. Latency is the p50 per step, the median
over --repeats measurements.

The weight-bandwidth floor is the float32 graph's weight bytes divided by the bandwidth
of a one-thread float32 numpy GEMV over a matrix of the same size (``rnnedge.bench``):
no float32 engine can step faster than reading every weight once. int8 weights are a
quarter of the bytes, so an int8 graph can beat it; the goals are int8 files <= 0.3x
float32 and int8 steps below the floor at hidden >= 256.

fp16 is meant for GPUs; on the CPU onnxruntime runs its recurrent nodes in float32
through inserted Casts, so its CPU latency here is shown for completeness only.
Prints a markdown table (and the machine); --json also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import rnnedge  # noqa: E402
from rnnedge import bench  # noqa: E402

MODELS = {
    "lstm 2x64->256": lambda: nn.LSTM(64, 256, num_layers=2, batch_first=True),
    "gru 64->256": lambda: nn.GRU(64, 256, batch_first=True),
    "gru 64->512": lambda: nn.GRU(64, 512, batch_first=True),
}
PRECISIONS = ("fp32", "int8", "fp16")


def run(calls: int, max_time: float, repeats: int) -> dict:
    torch.manual_seed(bench.SEED)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rnnedge-bench-precision-") as tmp:
        for label, make in MODELS.items():
            model = make().eval()
            paths, reports = {}, {}
            for prec in PRECISIONS:
                paths[prec] = Path(tmp) / f"{label.split()[0]}_{prec}.onnx"
                reports[prec] = rnnedge.export(model, paths[prec], example_input=torch.randn(1, 1, 64),
                                               precision=prec)
            floor = bench.measure_floor(onnx.load(paths["fp32"]))
            rng = np.random.default_rng(bench.SEED)
            args = [rng.standard_normal((1, 1, 64)).astype(np.float32) for _ in range(64)]
            engines = {p: bench.RnnedgeEngine(paths[p], "cpu", 1) for p in PRECISIONS}
            # A shared machine has bursts of contention: the measurement is repeated and each
            # precision's median p50 over the repeats is kept.
            p50s = {p: [] for p in PRECISIONS}
            for _ in range(repeats):
                jobs = [(engines[p], engines[p].prepare(1), args) for p in PRECISIONS]
                times = bench.measure_interleaved(jobs, calls, max_time)
                for prec, ns in zip(PRECISIONS, times):
                    p50s[prec].append(float(np.percentile(ns / 1000.0, 50)))
            fp32_bytes = paths["fp32"].stat().st_size
            for prec in PRECISIONS:
                parity = reports[prec].metadata["parity"]
                p50 = float(np.median(p50s[prec]))
                rows.append({
                    "model": label, "precision": prec, "bytes": paths[prec].stat().st_size,
                    "size_ratio": paths[prec].stat().st_size / fp32_bytes,
                    "p50_us_per_step": p50, "floor_us_per_step": floor.us_per_step,
                    "floor_ratio": p50 / floor.us_per_step, "p50_repeats": p50s[prec],
                    "gate_max_abs": parity["max_abs"], "gate_drift": parity.get("drift"),
                })
    return {"rows": rows, "machine": bench.machine_info(1, "cpu"), "versions": bench.versions(),
            "floor": {"gemv_bytes_per_s": floor.gemv_bytes_per_s}}


def table(result: dict) -> str:
    lines = [
        "| model | precision | file | × fp32 | p50 µs/step | floor µs/step | × floor | gate max abs | gate drift |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        drift = "" if r["gate_drift"] is None else f"{r['gate_drift']:.4f}"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['bytes'] / 1024:.0f} KiB | {r['size_ratio']:.2f} | "
            f"{r['p50_us_per_step']:.1f} | {r['floor_us_per_step']:.1f} | {r['floor_ratio']:.2f} | "
            f"{r['gate_max_abs']:.2g} | {drift} |")
    m, v = result["machine"], result["versions"]
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores available, 1 thread; "
                 + ", ".join(f"{k} {val}" for k, val in v.items()) + "; "
                 f"GEMV bandwidth {result['floor']['gemv_bytes_per_s'] / 1e9:.1f} GB/s (last model).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per precision")
    parser.add_argument("--max-time", type=float, default=3.0, help="seconds per precision at most")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per model (median kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    result = run(args.calls, args.max_time, args.repeats)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
