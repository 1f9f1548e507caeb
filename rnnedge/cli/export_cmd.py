"""``rnnedge export MODEL -o OUT.onnx``."""

from __future__ import annotations

import click

from rnnedge.cli.common import (
    handles_errors,
    human_size,
    load_with_example,
    model_options,
    progress_status,
)


@click.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the ONNX graph.")
@model_options
@click.option("--mode", type=click.Choice(["stream", "sequence"]), default="stream", show_default=True,
              help="stream: state carried between calls; sequence: one whole sequence per call.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--atol", type=float, default=None, help="Parity absolute tolerance (float32: 1e-5).")
@click.option("--rtol", type=float, default=None, help="Parity relative tolerance (float32: 1e-4).")
@handles_errors
def command(model_path, output, arch, arch_kwargs, trust_pickle, input_shape, input_dtype,
            mode, opset, atol, rtol):
    """Export MODEL to a stateful step-wise ONNX graph, proven equal to eager PyTorch."""
    from rnnedge.exporters import export

    with progress_status() as status:
        module, example, axes = load_with_example(
            model_path, arch, arch_kwargs, trust_pickle, input_shape, input_dtype, status)
        status("exporting")
        report = export(module, output, example_input=example, mode=mode, opset=opset,
                        atol=atol, rtol=rtol, input_axes=[axes],
                        progress=lambda case: status(f"parity gate: {case}"))
    parity = report.metadata["parity"]
    click.echo(
        f"wrote {report.path} ({human_size(report.graph['bytes'])}, {report.metadata['mode']} mode): "
        f"parity {parity['cases']} cases passed, max abs {parity['max_abs']:.2g}, "
        f"max rel {parity['max_rel']:.2g} (atol {report.atol:g}, rtol {report.rtol:g})"
    )
