"""Shared CLI pieces: model-loading options, progress, sizes. (Errors: rnnedge.cli.group.)"""

from __future__ import annotations

import contextlib

import click


def model_options(func):
    """The options that say how to load a PyTorch model file (shared by export/verify/bench)."""
    options = [
        click.option("--arch", metavar="MODULE:CLASS",
                     help="The model's class for a state_dict/checkpoint: module:Class or path/to/file.py:Class."),
        click.option("--arch-kwargs", metavar="JSON", help="Constructor arguments for --arch, as a JSON object."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a pickled whole module (runs code from the file)."),
        click.option("--input-shape", metavar="AXES",
                     help="One call's input shape, e.g. batch,time,16 (names are dynamic axes, numbers fixed sizes)."),
        click.option("--input-dtype", type=click.Choice(["float32", "int64"]), default="float32",
                     show_default=True, help="The input's dtype (int64 for token ids)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_with_example(model_path, arch, arch_kwargs, trust_pickle, input_shape, input_dtype,
                      status=None):
    """(module, example input, input axes) from the shared model options."""
    from rnnedge.errors import UsageError
    from rnnedge.loaders import load_model, make_example, parse_input_shape

    if status:
        status(f"loading {model_path}")
    module = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    if not input_shape:
        raise UsageError(
            "--input-shape is required: give one call's input shape, e.g. batch,time,16 for a "
            "batch-first sequence or batch,16 for a cell"
        )
    axes = parse_input_shape(input_shape)
    return module, make_example(module, axes, input_dtype), axes


@contextlib.contextmanager
def progress_status(enabled: bool = True):
    """A spinner on stderr (terminals only); yields ``update(text)``."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda text: None
        return
    with console.status("starting") as status:
        yield lambda text: status.update(text)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
