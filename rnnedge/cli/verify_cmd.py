"""``rnnedge verify OUT.onnx --against MODEL``: the parity gate again, on the file as written."""

from __future__ import annotations

import json
import math

import click

from rnnedge.cli.common import InputOptions, model_options, progress_status
from rnnedge.limits import check_tolerance

DEVICES = click.Choice(["cpu", "cuda", "auto"])


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def print_report(report, console=None) -> None:
    """The per-case and per-tensor tables, then one summary line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=120)
    precision = "" if report.precision == "fp32" else f"{report.precision} graph, "
    cases = Table(title=f"parity of {report.path.name} against {report.source} "
                        f"({precision}atol {report.atol:g}, rtol {report.rtol:g}, {report.device})")
    for col, justify in (("case", "left"), ("max abs", "right"), ("max rel", "right"), ("result", "left")):
        cases.add_column(col, justify=justify)
    for c in report.cases:
        if c.passed:
            result = "[green]ok[/green]"
        elif c.error:
            result = f"[red]FAILED to run: {c.error[:60]}[/red]"
        else:
            result = "[red]MISS " + ", ".join(t.name for t in c.misses) + "[/red]"
        cases.add_row(c.name, _fmt(c.max_abs), _fmt(c.max_rel), result)
    console.print(cases)
    tensors = Table(title="worst per tensor over all cases")
    # The case named is the worst abs error's, next to it: the worst max rel may be another's.
    for col, justify in (("tensor", "left"), ("role", "left"), ("max abs", "right"),
                         ("worst abs in", "left"), ("max rel", "right"), ("result", "left")):
        tensors.add_column(col, justify=justify)
    for t in report.tensors:
        tensors.add_row(t.name, t.role, _fmt(t.max_abs), t.worst_case or "(bit-exact)",
                        _fmt(t.max_rel), "[green]ok[/green]" if t.passed else "[red]MISS[/red]")
    console.print(tensors)


@click.command("verify", short_help="Re-run the parity gate of a graph against its PyTorch model.")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(dir_okay=False))
@click.option("--against", "model_path", metavar="MODEL", required=True, type=click.Path(dir_okay=False),
              help="The PyTorch model file the graph was exported from.")
@model_options
@click.option("--device", type=DEVICES, default="cpu", show_default=True,
              help="Where onnxruntime runs the graph (cuda: CUDA provider; auto: CUDA if usable).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default from the graph's dtype; float32: 1e-5).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (float32 default: 1e-4).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (exit status as without).")
@click.option("--min-length", type=int, default=None, metavar="STEPS",
              help="The fewest time steps the model takes: every probe and gate length is at least this.")
@click.option("--max-length", type=int, default=None, metavar="STEPS",
              help="The longest run the gate proves (default: 2000 whole in sequence mode, 1000 streamed in stream mode).")
@click.option("--state-arg", metavar="NAME", default=None,
              help="The name of forward's state parameter of a step-protocol module (as for export).")
def command(graph_path, model_path, arch, arch_kwargs, trust_pickle, input_shape, input_dtype,
            inputs, device, atol, rtol, as_json, min_length, max_length, state_arg):
    """Re-run the parity gate of GRAPH against MODEL and print the error per case and tensor.

    The plan (eager reference, seeded inputs) is rebuilt from MODEL; the gate runs on
    GRAPH's own bytes. --input-shape (--input) defaults to the graph's inputs. Exit 1 on any miss.
    """
    import warnings

    from rnnedge.exporters.verify import raise_on_failure, verify
    from rnnedge.loaders import load_model

    for label, value in (("--atol", atol), ("--rtol", rtol)):  # before loading anything
        if value is not None:
            check_tolerance(label, value)
    from rnnedge.gate.lengths import check_length_range

    check_length_range(min_length, max_length)
    parsed = InputOptions.parse(input_shape, input_dtype, inputs)
    with progress_status(not as_json) as status, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status(f"loading {model_path}")
        module = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
        example = axes = None
        if parsed.specs:
            tensors, axes, _ = parsed.example(module)  # --input names checked against forward
            example = tensors[0] if len(tensors) == 1 else tensors
        report = verify(graph_path, module, example_input=example,
                        input_axes=axes if axes is None or len(axes) > 1 else axes[0],
                        atol=atol, rtol=rtol, device=device, source=str(model_path),
                        progress=lambda case: status(f"parity gate: {case}"),
                        min_length=min_length, max_length=max_length, state_arg=state_arg)
    for w in caught:  # e.g. device=auto falling back to the CPU: one line, not a traceback
        if "rnnedge" in str(w.message):
            click.echo(f"note: {str(w.message).removeprefix('rnnedge: ')}", err=True)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report)
        if report.passed:
            click.echo(
                f"verified: {report.path.name} equals {model_path}: {len(report.cases)} cases passed, "
                f"max abs {report.max_abs:.2g}, max rel {report.max_rel:.2g} "
                f"({'' if report.precision == 'fp32' else report.precision + ', '}"
                f"atol {report.atol:g}, rtol {report.rtol:g}, {report.device})"
            )
    raise_on_failure(report)
