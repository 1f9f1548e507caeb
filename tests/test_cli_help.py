"""The ``rnnedge`` group: help for every command, lazy loading, and the one place errors map to exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from rnnedge.cli import COMMANDS
from rnnedge.cli.group import LazyGroup
from rnnedge.errors import ExportError, ParityError, UsageError

USAGE = {  # command -> the first line of its --help ("" is the root)
    "": "Usage: rnnedge [OPTIONS] COMMAND [ARGS]...",
    "export": "Usage: rnnedge export [OPTIONS] MODEL",
    "inspect": "Usage: rnnedge inspect [OPTIONS] GRAPH",
    "verify": "Usage: rnnedge verify [OPTIONS] GRAPH",
    "bench": "Usage: rnnedge bench [OPTIONS] GRAPH",
    "demo": "Usage: rnnedge demo [OPTIONS]",
    "serve": "Usage: rnnedge serve [OPTIONS] MODEL.onnx",
}


def test_the_help_table_covers_every_command():
    assert set(USAGE) == {"", *COMMANDS}


@pytest.mark.parametrize("name", list(USAGE))
def test_help_of_every_command(cli, name):
    result = cli(*([name] if name else []), "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(USAGE[name] + "\n"), result.stdout
    if name:
        assert "--debug" in result.stdout  # the group gives every command its --debug
    else:
        for command in COMMANDS:
            assert f"\n  {command} " in result.stdout


# One interpreter, so that what one help imports is not hidden by what another already did.
PROBE = """
import json, sys
from rnnedge.cli import main
seen = {}
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="rnnedge")
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
    seen[" ".join(args)] = sorted(m for m in sys.modules
                                  if m.split(".")[0] in ("torch", "onnx", "onnxruntime")
                                  or m.startswith("rnnedge.cli."))
print(json.dumps(seen))
"""


def test_help_imports_neither_torch_nor_unused_commands():
    runs = [["inspect", "--help"], ["--help"], ["export", "--help"], ["verify", "--help"],
            ["bench", "--help"], ["demo", "--help"], ["--version"]]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    # inspect's help loads only inspect's module: commands load when used
    assert [m for m in seen["inspect --help"] if m.endswith("_cmd")] == ["rnnedge.cli.inspect_cmd"]
    for args, modules in seen.items():
        heavy = [m for m in modules if not m.startswith("rnnedge.")]
        assert heavy == [], f"rnnedge {args} imported {heavy[:5]}"


# --- the error mapping, through a group of the same kind with commands that fail on purpose ---

def _raiser(exc: BaseException):
    @click.command()
    @click.option("--size", type=click.IntRange(min=1), default=1)
    def command(size):
        raise exc
    return command


# The group finds these by name, as rnnedge's finds its commands' modules.
usage = _raiser(UsageError("--input-shape is required: give one call's shape"))
export = _raiser(ExportError("could not write out.onnx: disk full; free space"))
parity = _raiser(ParityError("parity gate failed on 2 of 12 cases\nhn max abs 0.3"))
interrupt = _raiser(KeyboardInterrupt())
bug = _raiser(ZeroDivisionError("division by zero"))
group = LazyGroup("rnnedge", lazy_commands={name: f"{__name__}:{name}" for name in
                                            ("usage", "export", "parity", "interrupt", "bug")})


@pytest.mark.parametrize("name,code,line", [
    ("usage", 2, "error: --input-shape is required: give one call's shape"),
    ("export", 1, "error: could not write out.onnx: disk full; free space"),
    ("parity", 1, "error: parity gate failed on 2 of 12 cases hn max abs 0.3"),
    ("interrupt", 130, "error: interrupted; nothing was written"),
    ("bug", 1, "error: unexpected ZeroDivisionError: division by zero (run again with --debug "
               "for the traceback, and report it)"),
])
def test_errors_are_one_line_with_their_exit_code(name, code, line):
    result = CliRunner().invoke(group, [name], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert result.stderr == line + "\n"
    assert result.stdout == ""


@pytest.mark.parametrize("name", ["usage", "parity", "bug"])
def test_debug_shows_the_traceback_then_the_line(name):
    result = CliRunner().invoke(group, [name, "--debug"], catch_exceptions=False)
    assert result.exit_code in (1, 2)
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.splitlines()[-1].startswith("error: ")


def test_click_usage_errors_stay_clicks():
    for args in (["usage", "--size", "0"], ["usage", "--nope"], ["usage", "extra"]):
        result = CliRunner().invoke(group, args, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert "Usage: rnnedge" in result.stderr and "Error:" in result.stderr
        assert "error: " not in result.stderr


def test_unknown_command_and_a_table_entry_that_is_not_a_command():
    result = CliRunner().invoke(group, ["nope"], catch_exceptions=False)
    assert result.exit_code == 2 and "No such command 'nope'" in result.stderr
    broken = LazyGroup("rnnedge", lazy_commands={"x": "json:dumps"})
    result = CliRunner().invoke(broken, ["x"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unexpected TypeError: json:dumps is a function")
