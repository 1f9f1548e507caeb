"""Shared CLI pieces: error mapping, lazy commands, model-loading options, progress."""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import traceback

import click

from rnnedge.errors import RnnedgeError, first_line


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handles_errors(func):
    """Map rnnedge errors to one line on stderr and their exit code; --debug re-raises."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return func(*args, **kwargs)
        except RnnedgeError as exc:
            if debug:
                traceback.print_exc()
            fail(str(exc), exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                traceback.print_exc()
            line = first_line(exc, 300, fallback="")
            fail(f"unexpected {type(exc).__name__}: {line} (run again with --debug for the "
                 "traceback, and report it)", 1)

    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


class _LazyCommand(click.Command):
    """A command whose module (and its imports) load only when the command is used."""

    def __init__(self, name: str, module: str, help_text: str):
        super().__init__(name, help=help_text)
        self._module = module
        self._real: click.Command | None = None

    def _load(self) -> click.Command:
        if self._real is None:
            self._real = importlib.import_module(self._module).command
        return self._real

    def get_short_help_str(self, limit: int = 150) -> str:
        return self.help or ""

    def make_context(self, info_name, args, parent=None, **extra):
        return self._load().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self._load().invoke(ctx)

    def get_params(self, ctx):
        return self._load().get_params(ctx)

    def get_help(self, ctx):
        return self._load().get_help(ctx)


def lazy_command(name: str, module: str, help_text: str) -> click.Command:
    return _LazyCommand(name, module, help_text)


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
    from rnnedge.loaders.model_file import load_model, make_example, parse_input_shape

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
