"""``--plot``: latency per step against chunk size, one line per engine (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from rnnedge.bench.engines import ENGINES
from rnnedge.bench.report import BenchReport
from rnnedge.errors import UsageError


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
    from rnnedge.files import atomic_path

    try:  # atomically, like every file rnnedge writes: never half a PNG, never the graph
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path
