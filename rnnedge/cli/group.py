"""The ``rnnedge`` group: commands loaded on first use, every error mapped to an exit code here.

``LazyGroup`` is the lazy group of click's documentation ("Lazily Loading Subcommands"): a
table ``{name: "module:attribute"}`` whose modules are imported only when a command is looked
up, so ``rnnedge --help`` and ``rnnedge inspect`` never import torch.

Errors are mapped in one place, ``LazyGroup.invoke``, which runs around a command's argument
parsing and its body:

==========================  =====  ================================================
raised                      exit   printed on stderr
==========================  =====  ================================================
``RnnedgeError``            its    ``error: <message>`` (``exit_code``: 2 usage, 1 failed run)
``KeyboardInterrupt``       130    ``error: interrupted; nothing was written``
click's own exceptions      click  click's usage message (exit 2), unchanged
any other exception (bug)   1      ``error: unexpected <Type>: ... report it``
==========================  =====  ================================================

Every command gets a ``--debug`` flag, which prints the traceback before that line.
"""

from __future__ import annotations

import importlib
import traceback

import click

from rnnedge.errors import RnnedgeError, first_line

# ctx.meta is one dict shared by a context and all its children, so the flag set while the
# command's own context parses is visible to the group's invoke that maps the error.
DEBUG_KEY = "rnnedge.debug"


def _remember_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


def debug_option() -> click.Option:
    """``--debug``: show tracebacks. Eager, so it is on before other options are checked."""
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_remember_debug, help="Show tracebacks.")


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (messages should be one line already; this makes sure)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class LazyGroup(click.Group):
    """A click group whose commands are ``{name: "module:attribute"}`` entries, imported when used.

    Each loaded command gets the ``--debug`` option; errors from parsing or running a command
    become one line ``error: ...`` on stderr and the exit code in the module's table.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, _, attribute = self.lazy_commands[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy_commands[cmd_name]} is a {type(command).__name__}, "
                            "expected a click command")
        if not any(param.name == "debug" for param in command.params):
            command.params.append(debug_option())
        return command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors (exit 2), --help, --version
        except RnnedgeError as exc:
            _fail(ctx, one_line(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted; nothing was written", 130, show_traceback=False)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: a bug
            line = first_line(exc, 300, fallback="")
            _fail(ctx, f"unexpected {type(exc).__name__}: {line} (run again with --debug for "
                       "the traceback, and report it)", 1)


def _fail(ctx: click.Context, message: str, code: int, show_traceback: bool = True):
    # Called inside the except block: print_exc shows the exception being handled.
    if show_traceback and ctx.meta.get(DEBUG_KEY):
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code) from None
