"""The report of a bench run: one Row per (engine, batch, chunk), the Floor, and the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


def write_json(report: BenchReport, path) -> Path:
    from rnnedge.files import write_bytes_atomic

    return write_bytes_atomic(path, (json.dumps(report.as_dict(), indent=2) + "\n").encode())
