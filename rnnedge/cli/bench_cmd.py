"""``rnnedge bench OUT.onnx``: per-step latency per engine, and the weight-bandwidth floor."""

from __future__ import annotations

import contextlib
import threading

import click

from rnnedge.cli.common import model_options


@contextlib.contextmanager
def progress_bar(enabled: bool = True, after: float = 1.0):
    """Yields ``update(done, total, label)``; a rich bar on stderr once a run passes ``after`` s.

    Short runs finish before the bar would appear, so they print nothing extra. A timer
    starts it, so that a long step with no update (building a model's plan) shows too.
    total None: a bar without a count.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda done, total, label: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True)
    lock = threading.Lock()
    latest = {"completed": 0, "total": None, "description": "starting"}
    task = None

    def show():
        nonlocal task
        with lock:
            if task is None:
                bar.start()
                task = bar.add_task(**latest)

    def update(done, total, label):
        with lock:
            latest.update(completed=done, total=total, description=label)
            if task is not None:
                bar.update(task, **latest)

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            if task is not None:
                bar.stop()


def render(report, console=None, title: str | None = None) -> None:
    """The results table, the floor, and which engine is faster than which."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    floor = report.floor
    step_graph = report.settings.get("step_graph")
    table = Table(title=title or f"{report.graph}: latency per step "
                  f"({report.settings['threads']} thread(s), {report.settings['device']})")
    cols = ["engine", "batch", "chunk", "p50 µs/step", "p90 µs/step", "p99 µs/step",
            "p50 µs/call", "steps/s", "× floor"]
    for col in cols:
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in report.results:
        table.add_row(r.engine, str(r.batch), "—" if step_graph else str(r.chunk),
                      f"{r.p50_us_per_step:,.1f}", f"{r.p90_us_per_step:,.1f}", f"{r.p99_us_per_step:,.1f}",
                      f"{r.p50_us_per_call:,.1f}", f"{r.steps_per_s:,.0f}", f"{r.floor_ratio:.2f}")
    console.print(table)
    console.print(f"floor: {floor.us_per_step:,.1f} µs/step = {floor.weight_bytes / 1024:,.1f} KiB of "
                  f"weights / {floor.gemv_bytes_per_s / 1e9:.1f} GB/s (one-thread float32 GEMV)")
    for line in summary_lines(report):
        console.print(line)


def summary_lines(report) -> list[str]:
    """Plain sentences: eager with vs without oneDNN, and rnnedge vs the others."""
    lines = []
    for batch, chunk, mk, plain in report.eager_comparison():
        where = f"batch {batch}" + ("" if report.settings.get("step_graph") else f", chunk {chunk}")
        if plain < mk:
            lines.append(f"eager ({where}): mkldnn disabled is faster, {plain:,.1f} vs {mk:,.1f} µs/step "
                         f"({mk / plain:.1f}×)")
        else:
            lines.append(f"eager ({where}): torch defaults (oneDNN) are faster, {mk:,.1f} vs {plain:,.1f} "
                         f"µs/step ({plain / mk:.1f}×)")
    for r in report.results:
        if r.engine != "rnnedge":
            continue
        where = f"batch {r.batch}" + ("" if report.settings.get("step_graph") else f", chunk {r.chunk}")
        parts = []
        for other in ("onnxruntime", "eager", "eager-no-mkldnn"):
            o = report.row(other, r.batch, r.chunk)
            if o:
                parts.append(f"{o.p50_us_per_step / r.p50_us_per_step:.2f}× vs {other}")
        if parts:
            lines.append(f"rnnedge ({where}): {r.p50_us_per_step:,.1f} µs/step, " + ", ".join(parts)
                         + " (>1: rnnedge faster)")
    return lines


def check_outputs(graph_path, model_path, arch, json_path, plot_path) -> None:
    """Before measuring: --json/--plot must be writable and replace none of the inputs."""
    from rnnedge.cli.export_cmd import input_files
    from rnnedge.files import check_destination

    inputs = {"GRAPH": graph_path, **(input_files(model_path, arch) if model_path else {})}
    if json_path:
        check_destination(json_path, inputs, what="--json file")
    if plot_path:
        check_destination(plot_path, {**inputs, "--json": json_path}, what="--plot file")


@click.command("bench", short_help="Measure per-step latency of a graph (and eager PyTorch).")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the graph runs (eager follows onto CUDA when torch has it).")
@click.option("--batch", "batch", default="1", show_default=True, metavar="N[,N...]",
              help="Rows per call, e.g. 1,64.")
@click.option("--chunk", "chunk", default="1,8,64", show_default=True, metavar="K[,K...]",
              help="Time steps per call (ignored for step graphs, which take one step per call).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Time steps fed per measurement (at least 20 calls).")
@click.option("--max-time", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
              help="Seconds at most per measurement (cuts --steps short for slow engines).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Intra-op threads for onnxruntime and torch (0: their defaults).")
@click.option("--engines", default=None, metavar="NAME[,NAME...]",
              help="Subset of rnnedge,onnxruntime,eager,eager-no-mkldnn (default: all that apply).")
@click.option("--against", "model_path", metavar="MODEL", type=click.Path(dir_okay=False), default=None,
              help="The PyTorch model the graph was exported from: adds the eager engines.")
@model_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw latency per step vs chunk per engine to this PNG (needs rnnedge[plot]).")
def command(graph_path, device, batch, chunk, steps, max_time, threads, engines, model_path, arch,
            arch_kwargs, trust_pickle, input_shape, input_dtype, inputs, json_path, plot_path):
    """Measure GRAPH's latency per step: the rnnedge stream, a plain onnxruntime loop, and
    eager PyTorch (--against), with the weight-bandwidth floor of this machine.

    --input-shape (--input) defaults to the graph's inputs.
    """
    import warnings

    from rnnedge.bench import benchmark, parse_list, plot, require_matplotlib, write_json
    from rnnedge.errors import UsageError

    batches, chunks = parse_list(batch, "batch"), parse_list(chunk, "chunk")
    names = [e.strip() for e in engines.split(",") if e.strip()] if engines else None
    check_outputs(graph_path, model_path, arch, json_path, plot_path)
    if plot_path:
        require_matplotlib()  # fail before minutes of measuring, not after
    if not model_path and (arch or input_shape or inputs):
        raise UsageError("--arch/--input-shape/--input describe the --against model; pass --against MODEL too")
    from rnnedge.cli.common import InputOptions

    parsed = InputOptions.parse(input_shape, input_dtype, inputs)
    module = axes = dtypes = None
    with progress_bar() as update, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if model_path:
            from rnnedge.loaders import load_model

            update(0, None, f"loading {model_path}")
            module = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
            if parsed.specs:  # in forward order, --input names checked against forward
                specs = parsed.ordered(module)
                axes, dtypes = [a for _, a, _ in specs], [d for _, _, d in specs]
                axes, dtypes = (axes[0], dtypes[0]) if len(axes) == 1 else (axes, dtypes)
        report = benchmark(graph_path, module=module, batches=batches, chunks=chunks, steps=steps,
                           threads=threads, device=device, engines=names, max_seconds=max_time,
                           input_axes=axes, input_dtype=dtypes, progress=update)
    for w in caught:
        if "rnnedge" in str(w.message):
            click.echo(f"note: {str(w.message).removeprefix('rnnedge: ')}", err=True)
    render(report)
    if json_path:
        click.echo(f"wrote {write_json(report, json_path)}")
    if plot_path:
        click.echo(f"wrote {plot(report, plot_path)}")
