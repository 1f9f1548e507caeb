"""Timing: single calls timed, the engines interleaved in rounds, percentiles into a Row."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from rnnedge.bench.report import Floor, Row

MIN_CALLS = 20  # per measurement, even when --steps / --max-time would allow fewer
ROUNDS = 10  # engines take turns in this many blocks of calls per measurement


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
