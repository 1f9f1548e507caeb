"""Shared CLI pieces: model-loading options, progress, sizes. (Errors: rnnedge.cli.group.)"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import click


def model_options(func):
    """The options that say how to load a PyTorch model file (shared by export/verify/bench)."""
    options = [
        click.option("--arch", metavar="MODULE:CLASS",
                     help="The model's class for a state_dict/checkpoint: module:Class or path/to/file.py:Class."),
        click.option("--arch-kwargs", metavar="JSON",
                     help="Constructor arguments for --arch, as a JSON object; a string "
                          "\"@module:Name\" or \"@path/to/file.py:Name\" passes that class or function.")
        ,
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a pickled whole module (runs code from the file)."),
        click.option("--input-shape", metavar="AXES",
                     help="One call's input shape, e.g. batch,time,16 (names are dynamic axes, numbers fixed sizes)."),
        click.option("--input-dtype", type=click.Choice(["float32", "int64"]), default=None,
                     help="The input's dtype (int64 for token ids)  [default: float32]"),
        click.option("--input", "inputs", metavar="NAME=SHAPE[:DTYPE]", multiple=True,
                     help="A data input of forward by its parameter name, e.g. x=batch,time,80 or "
                          "tokens=batch,time:int64; repeat it for several inputs (instead of "
                          "--input-shape)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True)
class InputOptions:
    """What --input-shape/--input-dtype or the --input options say, parsed (no model yet).

    specs: [(name or None, axes, dtype)], one per data input as given; empty when none was.
    """

    specs: tuple = ()

    @classmethod
    def parse(cls, input_shape, input_dtype, inputs) -> InputOptions:
        """Checked before any model is loaded: a usage error costs no loading."""
        from rnnedge.errors import UsageError
        from rnnedge.loaders import parse_input, parse_input_shape

        if inputs and (input_shape or input_dtype):
            raise UsageError("--input NAME=SHAPE[:DTYPE] and --input-shape/--input-dtype cannot be "
                             "combined: give every input with --input (its dtype after a colon)")
        if inputs:
            specs = tuple(parse_input(text) for text in inputs)
            names = [name for name, _, _ in specs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise UsageError(f"--input {twice[0]} is given twice; give each input once")
            return cls(specs)
        if input_shape:
            return cls(((None, parse_input_shape(input_shape), input_dtype or "float32"),))
        return cls()

    @property
    def names(self) -> list | None:
        """The inputs' names (--input), else None."""
        return [s[0] for s in self.specs] if self.specs and self.specs[0][0] else None

    def ordered(self, module) -> list:
        """The specs [(name or None, axes, dtype)] in ``module``'s forward order (--input
        names checked against forward)."""
        from rnnedge.loaders import forward_order

        specs = list(self.specs)
        if self.names:
            order = forward_order(module, self.names)
            specs.sort(key=lambda s: order.index(s[0]))
        return specs

    def example(self, module) -> tuple:
        """(example tensors in forward order, [axes], [names] or None) for ``module``."""
        from rnnedge.loaders import make_examples

        specs = self.ordered(module)
        tensors = make_examples(module, [(axes, dtype) for _, axes, dtype in specs])
        names = [s[0] for s in specs] if self.names else None
        return tensors, [axes for _, axes, _ in specs], names


def check_constants(constants, parsed: InputOptions) -> None:
    """--constant NAME must name an --input without a time axis."""
    from rnnedge.errors import UsageError

    names = parsed.names or []
    for name in constants:
        if name not in names:
            raise UsageError(f"--constant {name} names no --input; the inputs given are "
                             f"{names or 'none (--constant needs --input NAME=SHAPE)'}")
        axes = next(a for n, a, _ in parsed.specs if n == name)
        if "time" in axes:
            raise UsageError(f"--constant {name}: a constant is fed once per stream and has no "
                             f"time axis, but --input gives it {','.join(map(str, axes))}")


def load_with_example(model_path, arch, arch_kwargs, trust_pickle, parsed: InputOptions,
                      status=None):
    """(module, example input (a tensor, or a tuple in forward order), [axes], [names] or
    None) from the shared model options."""
    from rnnedge.errors import UsageError
    from rnnedge.loaders import load_model

    if not parsed.specs:  # before loading: a missing option costs no loading
        raise UsageError(
            "--input-shape is required (or --input NAME=SHAPE per input): give one call's input "
            "shape, e.g. batch,time,16 for a batch-first sequence or batch,16 for a cell"
        )
    if status:
        status(f"loading {model_path}")
    module = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    tensors, axes, names = parsed.example(module)
    return module, (tensors[0] if len(tensors) == 1 else tensors), axes, names


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
