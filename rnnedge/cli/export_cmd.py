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
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Store weights as int8 (onnxruntime dynamic quantization; for CPUs). Gate: atol/rtol 5e-2.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Float precision; fp16 is for GPUs (inputs/outputs stay float32). Gate: atol/rtol 1e-2.")
@click.option("--triton-repo", metavar="DIR", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton model repository: DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx.")
@click.option("--triton-name", metavar="NAME", default=None,
              help="The Triton model name (default: the output file's stem).")
@handles_errors
def command(model_path, output, arch, arch_kwargs, trust_pickle, input_shape, input_dtype,
            mode, opset, atol, rtol, quantize, precision, triton_repo, triton_name):
    """Export MODEL to a stateful step-wise ONNX graph, proven equal to eager PyTorch."""
    from rnnedge.errors import UsageError
    from rnnedge.exporters import export

    if quantize and precision == "fp16":
        raise UsageError("--quantize int8 and --precision fp16 cannot be combined: int8 is for "
                         "CPUs, fp16 for GPUs; choose one")
    precision = quantize or precision or "fp32"
    with progress_status() as status:
        module, example, axes = load_with_example(
            model_path, arch, arch_kwargs, trust_pickle, input_shape, input_dtype, status)
        status("exporting")
        report = export(module, output, example_input=example, mode=mode, opset=opset,
                        atol=atol, rtol=rtol, input_axes=[axes],
                        progress=status,
                        precision=precision, triton_repo=triton_repo, triton_name=triton_name)
    parity = report.metadata["parity"]
    size = human_size(report.graph["bytes"])
    if report.precision != "fp32":
        ratio = report.graph["bytes"] / report.fp32_bytes if report.fp32_bytes else float("nan")
        size = f"{report.precision}, {size}, {ratio:.2f}x the fp32 graph, gate on {report.device}"
    click.echo(
        f"wrote {report.path} ({size}, {report.metadata['mode']} mode): "
        f"parity {parity['cases']} cases passed, max abs {parity['max_abs']:.2g}, "
        f"max rel {parity['max_rel']:.2g} (atol {report.atol:g}, rtol {report.rtol:g})"
    )
    if report.triton is not None:
        click.echo(
            f"wrote Triton model {report.triton.name!r} to {report.triton} (batch-first variant: "
            f"parity {len(report.triton_cases)} cases passed); serve it with "
            f"tritonserver --model-repository {report.triton.parent}"
        )
