"""GPU check for the rnnedge runtime: CPU-vs-CUDA parity and per-step latency, state on device.

    python benchmarks/gpu_check.py [--steps 1000] [--json out.json]
    python benchmarks/gpu_check.py --device cpu   # dry run of the script's logic, no GPU

On a machine with onnxruntime-gpu and a GPU (well under 5 minutes), for a 2-layer LSTM
64->256 built with onnx.helper:

1. parity: the same 1000 streamed steps (batch 4, chunks of 1-3 steps) on CPU and on
   CUDA; prints the worst output and state differences and fails above --atol.
2. state residency, checked: every state OrtValue the CUDA stream binds is on the
   device ("cuda"), and across all steps the bound state buffers are exactly the two
   ping-pong buffers made at the start (their data_ptr values never change and
   alternate); an onnxruntime profile of the CUDA session has no Memcpy nodes (no
   node of the graph fell back to the CPU, so nothing inside a step leaves the GPU).
3. latency per step at batch 1 and 64: rnnedge Stream.step (state on the device)
   against session.run with numpy state (a host round trip of the state every step),
   and the CPU stream for reference.

Exit status 0 when every check passes, 1 when one fails, 2 when CUDA is not usable.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runtime import build  # noqa: E402

import rnnedge  # noqa: E402
from rnnedge.errors import DeviceError  # noqa: E402
from rnnedge.runtime.contract import METADATA_KEY, graph_io, read_contract  # noqa: E402
from rnnedge.runtime.model import Model  # noqa: E402
from rnnedge.runtime.providers import CPU_EP, CUDA_EP, session_options  # noqa: E402


def parity(data: bytes, device: str, steps: int, atol: float) -> dict:
    cpu = rnnedge.load(data, device="cpu").stream(batch=4)
    dev = rnnedge.load(data, device=device).stream(batch=4)
    rng = np.random.default_rng(0)
    worst = 0.0
    done = 0
    while done < steps:
        length = int(rng.integers(1, 4))
        x = rng.standard_normal((length, 4, 64)).astype(np.float32)
        worst = max(worst, float(np.abs(cpu.step(x) - dev.step(x)).max()))
        done += length
    state_diff = max(float(np.abs(cpu.state[k] - dev.state[k]).max()) for k in cpu.state)
    ok = worst <= atol and state_diff <= atol
    return {"steps": done, "max_abs_output": worst, "max_abs_state": state_diff, "atol": atol, "ok": ok}


def residency(data: bytes, device: str, steps: int) -> dict:
    model = rnnedge.load(data, device=device)
    stream = model.stream(batch=1)
    engine = stream._engine
    want = "cuda" if device.startswith("cuda") else "cpu"
    sides = [[v.data_ptr() for v in side] for side in engine.bufs]
    names = [[v.device_name() for v in side] for side in engine.bufs]
    x = np.ones((1, 1, 64), np.float32)
    problems = []
    if any(n != want for side in names for n in side):
        problems.append(f"state buffers are on {names}, not {want}")
    for i in range(steps):
        before = [v.data_ptr() for v in engine.current()]
        stream.step(x)
        after = [v.data_ptr() for v in engine.current()]
        if before not in sides or after not in sides or before == after:
            problems.append(f"step {i}: state moved from {before} to {after}, buffers are {sides}")
            break
        if any(v.device_name() != want for v in engine.current()):
            problems.append(f"step {i}: state left the {want}")
            break
    if want == "cuda":
        # Outputs too stay on the device until read.
        stream.step(x, read=False)
        placed = [v.device_name() for v in stream._slot.out_bufs]
        if any(n != "cuda" for n in placed):
            problems.append(f"outputs are bound on {placed}, not cuda")
        if stream.read().shape != (1, 1, stream._slot.out_bufs[0].shape()[-1]):
            problems.append("read() after step(read=False) gave the wrong shape")
    return {"device_names": names, "data_ptrs": sides, "steps": steps, "problems": problems,
            "ok": not problems}


def memcpy_nodes(data: bytes, device: str) -> dict:
    """Profile a few steps of the session; on CUDA, Memcpy nodes mean CPU-placed nodes inside."""
    opts = session_options(1)
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "rnnedge")
    device_id = int(device.partition(":")[2] or 0)
    eps = [(CUDA_EP, {"device_id": device_id}), CPU_EP] if device.startswith("cuda") else [CPU_EP]
    sess = ort.InferenceSession(data, opts, providers=eps)
    contract = read_contract(sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY),
                             graph_io(sess.get_inputs()), graph_io(sess.get_outputs()))
    stream = Model(sess, contract, device, "<profiled>").stream(batch=1)
    for _ in range(20):
        stream.step(np.ones((1, 1, 64), np.float32))
    path = sess.end_profiling()
    with open(path) as fh:
        events = json.load(fh)
    kernels = [e for e in events if e.get("cat") == "Node"]
    memcpy = sorted({e["name"] for e in kernels
                     if "memcpy" in (e["name"] + e.get("args", {}).get("op_name", "")).lower()})
    providers = sorted({e.get("args", {}).get("provider", "?") for e in kernels})
    for leftover in glob.glob(opts.profile_file_prefix + "*"):
        os.remove(leftover)
    return {"nodes_profiled": len(kernels), "memcpy_nodes": memcpy, "providers": providers,
            "ok": bool(kernels) and not memcpy}


def latency(data: bytes, device: str, batch: int, steps: int) -> dict:
    model = rnnedge.load(data, device=device)
    x = np.random.default_rng(1).standard_normal((1, batch, 64)).astype(np.float32)
    stream = model.stream(batch=batch)
    sess = model.session
    state = {s.input: s.zeros(batch) for s in model.contract.states}
    names = ["output"] + [s.output for s in model.contract.states]

    def plain():
        got = sess.run(names, {"input": x, **state})
        state.update(zip(model.state_names, got[1:]))

    cpu_stream = rnnedge.load(data, device="cpu").stream(batch=batch)
    out = {}
    for label, fn in (("stream", lambda: stream.step(x)), ("plain_run", plain),
                      ("cpu_stream", lambda: cpu_stream.step(x))):
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(steps // 5):
                fn()
            best = min(best, (time.perf_counter() - t0) / (steps // 5) * 1e6)
        out[label] = best
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--json")
    args = parser.parse_args()

    print(f"onnxruntime {ort.__version__} ({ort.get_device()}), available {ort.get_available_providers()}")
    data, _ = build("LSTM", 64, 256, 2)
    try:
        model = rnnedge.load(data, device=args.device)
    except DeviceError as exc:
        print(f"CUDA not usable: {exc}")
        return 2
    print(f"device {model.device}, session providers {model.session.get_providers()}")

    report = {"device": model.device, "providers": model.session.get_providers()}
    t0 = time.perf_counter()
    report["parity"] = parity(data, args.device, args.steps, args.atol)
    print(f"parity over {report['parity']['steps']} steps: max |cpu-{args.device}| output "
          f"{report['parity']['max_abs_output']:.2e}, state {report['parity']['max_abs_state']:.2e} "
          f"-> {'ok' if report['parity']['ok'] else 'FAIL'} (atol {args.atol:g}; float32 on a GPU "
          "may use TF32 math, which differs around 1e-3)")
    report["residency"] = residency(data, args.device, args.steps)
    print(f"state residency over {args.steps} steps: buffers on {report['residency']['device_names']}, "
          f"ping-pong data_ptrs {report['residency']['data_ptrs']} -> "
          f"{'ok' if report['residency']['ok'] else 'FAIL ' + '; '.join(report['residency']['problems'])}")
    report["profile"] = memcpy_nodes(data, model.device)
    print(f"profile: {report['profile']}")
    report["latency_us"] = {}
    for batch in (1, 64):
        lat = latency(data, args.device, batch, args.steps)
        report["latency_us"][batch] = lat
        print(f"batch {batch:>3}: us per step  stream({args.device}, state on device) "
              f"{lat['stream']:.1f}   session.run with numpy state {lat['plain_run']:.1f}   "
              f"cpu stream {lat['cpu_stream']:.1f}")
    report["seconds"] = time.perf_counter() - t0
    ok = all(report[k]["ok"] for k in ("parity", "residency", "profile"))
    print(f"{'ALL OK' if ok else 'FAILED'} in {report['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
