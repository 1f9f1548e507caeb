"""``rnnedge export MODEL -o OUT.onnx``."""

from __future__ import annotations

from pathlib import Path

import click

from rnnedge.cli.common import (
    InputOptions,
    check_constants,
    human_size,
    load_with_example,
    model_options,
    progress_status,
)
from rnnedge.limits import check_tolerance


def input_files(model_path, arch) -> dict:
    """{label: path} of the files a command reads: MODEL and an --arch path/to/file.py."""
    inputs = {"MODEL": model_path}
    where = (arch or "").rpartition(":")[0]
    if where.endswith(".py"):
        inputs["the --arch file"] = where
    return inputs


def check_paths(model_path, output, arch, triton_repo, triton_name) -> None:
    """Before loading anything: no output may replace an input or land where it must not."""
    from rnnedge.errors import UsageError
    from rnnedge.files import check_destination, check_not_inputs, inside

    inputs = input_files(model_path, arch)
    check_destination(output, inputs)
    # A graph over the external-data threshold also writes OUTPUT.data (rnnedge.graphs.external).
    check_not_inputs(f"{output}.data", inputs, what="external data file")
    if triton_repo is None:
        return
    if inside(output, triton_repo):
        raise UsageError(
            f"the graph file {output} would land in or on the Triton repository {triton_repo}; "
            "write it outside the repository (the repository gets its own batch-first copy)"
        )
    folder = Path(triton_repo) / (triton_name or Path(output).stem)
    for label, source in inputs.items():
        if inside(source, folder):  # the model folder is replaced as a whole
            raise UsageError(
                f"refusing to write the Triton model folder {folder}: it holds {label} {source}, "
                "which would be lost; choose another --triton-repo or --triton-name"
            )


@click.command("export", short_help="Export a model to a stateful ONNX graph, proven by the parity gate.")
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
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
              show_default=True, help="onnxruntime: batch-first variant, implicit state (NVIDIA's "
              "containers); python: the rnnedge runtime in Triton's Python backend (CPU hosts).")
@click.option("--min-length", type=int, default=None, metavar="STEPS",
              help="The fewest time steps the model takes: every probe and gate length is at least this.")
@click.option("--max-length", type=int, default=None, metavar="STEPS",
              help="The longest run the gate proves (default: 2000 whole in sequence mode, 1000 streamed in stream mode).")
@click.option("--constant", "constants", metavar="NAME", multiple=True,
              help="An --input that is constant per stream (e.g. an attention memory): no time "
                   "axis; the runtime takes it once per stream (constants=). Repeatable.")
@click.option("--state-arg", metavar="NAME", default=None,
              help="The name of forward's state parameter of a step-protocol module (default: "
                   "found from the signature).")
@click.option("--state", "state", type=click.Choice(["carried", "none"]), default="carried",
              show_default=True,
              help="none: a sequence graph that starts every call from zero state inside, with "
                   "no state inputs/outputs (--mode sequence; chosen by itself when a layer runs "
                   "over chunks folded into the batch).")
def command(model_path, output, arch, arch_kwargs, trust_pickle, input_shape, input_dtype, inputs,
            mode, opset, atol, rtol, quantize, precision, triton_repo, triton_name,
            triton_backend, min_length, max_length, constants, state_arg, state):
    """Export MODEL to a stateful step-wise ONNX graph, proven equal to eager PyTorch."""
    from rnnedge.errors import UsageError
    from rnnedge.exporters import export

    if quantize and precision == "fp16":
        raise UsageError("--quantize int8 and --precision fp16 cannot be combined: int8 is for "
                         "CPUs, fp16 for GPUs; choose one")
    precision = quantize or precision or "fp32"
    check_paths(model_path, output, arch, triton_repo, triton_name)
    from rnnedge.gate.lengths import check_length_range

    check_length_range(min_length, max_length)  # a usage error before loading anything
    parsed = InputOptions.parse(input_shape, input_dtype, inputs)
    check_constants(constants, parsed)
    for label, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None:
            check_tolerance(label, value)
    with progress_status() as status:
        module, example, axes, names = load_with_example(
            model_path, arch, arch_kwargs, trust_pickle, parsed, status)
        status("exporting")
        report = export(module, output, example_input=example, mode=mode, opset=opset,
                        atol=atol, rtol=rtol, input_axes=axes, input_names=names,
                        constants=constants, state_arg=state_arg,
                        states="internal" if state == "none" else "carried", progress=status,
                        precision=precision, triton_repo=triton_repo, triton_name=triton_name,
                        min_length=min_length, max_length=max_length,
                        triton_backend=triton_backend)
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
    if report.triton is not None and triton_backend == "python":
        click.echo(
            f"wrote Triton model {report.triton.name!r} to {report.triton} (Python backend: the "
            "graph above in the rnnedge runtime); serve it with rnnedge serve, or tritonserver "
            f"--model-repository {report.triton.parent} where numpy<2, onnxruntime and rnnedge "
            "are installed")
    elif report.triton is not None:
        click.echo(
            f"wrote Triton model {report.triton.name!r} to {report.triton} (batch-first variant: "
            f"parity {len(report.triton_cases)} cases passed); serve it with "
            f"tritonserver --model-repository {report.triton.parent}"
        )
