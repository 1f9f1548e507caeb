"""Load test: a live Triton server (``rnnedge serve``'s Python backend) against the in-process Pool.

For 1, 8, 32 and 128 concurrent streams, every stream sends one time step per request
(gRPC, ``sequence_id`` per stream) and waits for its answer before the next; the figures are
stream-steps per second (all streams together) and p50/p99 request latency. The upper
bound is the same graph stepped in-process by ``rnnedge.load(...).pool()`` with the same
streams (one batched ``pool.step`` per time step; its latency is that call's).

Clients run in ``--clients`` processes (asyncio, ``tritonclient.grpc.aio``) on the same
machine as the server, so on a small machine they compete with it for the CPUs: the
figures are what one host serving itself gets, a lower bound for a server with its own.

    python benchmarks/bench_triton.py [--streams 1,8,32,128] [--steps 200] [--write]

``--write`` puts the table in benchmarks/RESULTS.md (between the bench_triton markers).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rnnedge.triton import server, server_env  # noqa: E402
from rnnedge.triton.python_backend import write_python_repository  # noqa: E402

NAME = "lstm"
FEATURES = 64
BEGIN, END = "<!-- bench_triton: begin -->", "<!-- bench_triton: end -->"


def export_model(folder: Path) -> Path:
    """The README's 2-layer LSTM 64→256 (batch-first), exported and proven."""
    import torch

    import rnnedge

    torch.manual_seed(0)
    model = torch.nn.LSTM(FEATURES, 256, num_layers=2, batch_first=True).eval()
    path = folder / f"{NAME}.onnx"
    rnnedge.export(model, path, example_input=torch.randn(1, 4, FEATURES))
    return path


def pool_figures(path: Path, streams: int, steps: int, warmup: int) -> dict:
    import rnnedge

    pool = rnnedge.load(path, device="cpu", threads=1).pool()
    ids = [pool.add() for _ in range(streams)]
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((steps + warmup, streams, 1, 1, FEATURES)).astype(np.float32)
    times = []
    start = 0.0
    for t in range(steps + warmup):
        if t == warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        pool.step({sid: xs[t, k] for k, sid in enumerate(ids)})
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return figures(streams * steps / wall, times[warmup:])


def figures(rate: float, latencies) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"rate": rate, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


async def _streams(url: str, sids: list, steps: int, warmup: int, barrier_at: float):
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput

    client = aio.InferenceServerClient(url)
    rng = np.random.default_rng(sids[0])
    x = rng.standard_normal((1, 1, FEATURES)).astype(np.float32)
    latencies, counted = [], [0.0, 0.0]

    async def one(sid):
        for t in range(steps + warmup):
            tensor = InferInput("input", [1, 1, FEATURES], "FP32")
            tensor.set_data_from_numpy(x)
            t0 = time.perf_counter()
            await client.infer(NAME, [tensor], sequence_id=sid, sequence_start=t == 0,
                               sequence_end=t == steps + warmup - 1)
            t1 = time.perf_counter()
            if t >= warmup:
                latencies.append(t1 - t0)

    await asyncio.sleep(max(0.0, barrier_at - time.time()))
    begin = time.perf_counter()
    await asyncio.gather(*(one(sid) for sid in sids))
    counted[0] = time.perf_counter() - begin
    await client.close()
    return latencies, counted[0]


def _client_process(url, sids, steps, warmup, barrier_at, queue):
    latencies, wall = asyncio.run(_streams(url, sids, steps, warmup, barrier_at))
    queue.put((latencies, wall))


def server_figures(url: str, streams: int, steps: int, warmup: int, clients: int, base: int) -> dict:
    sids = list(range(base, base + streams))
    groups = [sids[i::clients] for i in range(min(clients, streams))]
    queue = mp.Queue()
    barrier_at = time.time() + 2.0  # every client process starts together
    procs = [mp.Process(target=_client_process, args=(url, g, steps, warmup, barrier_at, queue))
             for g in groups]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    latencies = [lat for r in results for lat in r[0]]
    wall = max(r[1] for r in results)
    # Warm-up steps run inside the wall time too; count them so the rate is not understated.
    return figures(streams * (steps + warmup) / wall, latencies)


def table(rows: list, meta: dict) -> str:
    lines = [
        BEGIN,
        "## Live Triton server (`rnnedge serve`, Python backend) vs the in-process Pool",
        "",
        "Generated by `python benchmarks/bench_triton.py --write`.",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}",
        f"- model: {meta['model']}; one time step per request (gRPC), each stream waiting for "
        "its answer before its next step; server: 1 instance, 1 onnxruntime thread, "
        f"max batch {meta['max_batch']}; clients: {meta['clients']} process(es) on the same "
        "machine (they share its CPUs with the server)",
        "- Pool: the same streams stepped in-process, one `pool.step` per time step (1 thread)",
        "",
        "| streams | server steps/s | server p50 ms | server p99 ms | Pool steps/s | Pool p50 ms "
        "| Pool p99 ms | server ÷ Pool |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, s, p in rows:
        lines.append(f"| {n} | {s['rate']:,.0f} | {s['p50']:.2f} | {s['p99']:.2f} | "
                     f"{p['rate']:,.0f} | {p['p50']:.2f} | {p['p99']:.2f} | "
                     f"{s['rate'] / p['rate']:.2f} |")
    return "\n".join(lines + ["", END]) + "\n"


def write_results(text: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text()
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", lambda m: text, old,
                     flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32,128")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(s) for s in args.streams.split(",")]
    env = server_env.provision(progress=print)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(Path(tmp))
        repo = Path(tmp) / "repo"
        write_python_repository(repo, NAME, path.read_bytes(), max_batch_size=args.max_batch,
                                rnnedge_path=str(server_env.rnnedge_source()))
        ports = server.free_ports()
        running = server.start(env, repo, ports)
        rows = []
        try:
            server.wait_ready(running, NAME)
            for k, n in enumerate(counts):
                s = server_figures(running.urls["grpc"], n, args.steps, args.warmup,
                                   args.clients, base=1 + k * 10_000)
                p = pool_figures(path, n, args.steps, args.warmup)
                rows.append((n, s, p))
                print(f"{n:4d} streams: server {s['rate']:9,.0f} steps/s p50 {s['p50']:.2f} ms "
                      f"p99 {s['p99']:.2f} ms | pool {p['rate']:9,.0f} steps/s p50 "
                      f"{p['p50']:.2f} ms p99 {p['p99']:.2f} ms | ratio {s['rate'] / p['rate']:.2f}",
                      flush=True)
        finally:
            server.stop(running)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.platform()}",
            "model": "nn.LSTM 64→256, 2 layers, batch-first", "max_batch": args.max_batch,
            "clients": args.clients}
    text = table(rows, meta)
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
