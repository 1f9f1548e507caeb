"""The ``rnnedge`` command: thin wrappers over the library, one clear line per error.

Exit codes: 0 success, 1 a failed export/verification/run, 2 a usage error, 130 Ctrl-C.
Tracebacks only with ``--debug``. The mapping lives in one place, ``rnnedge.cli.group``.
"""

from __future__ import annotations

import click

from rnnedge import __version__
from rnnedge.cli.group import LazyGroup

# name -> "module:attribute". A command's module loads only when the command is used (or
# listed by --help); modules import torch inside their commands, so help stays torch-free.
COMMANDS = {
    "export": "rnnedge.cli.export_cmd:command",
    "inspect": "rnnedge.cli.inspect_cmd:command",
    "verify": "rnnedge.cli.verify_cmd:command",
    "bench": "rnnedge.cli.bench_cmd:command",
    "demo": "rnnedge.cli.demo_cmd:command",
    "serve": "rnnedge.cli.serve_cmd:command",
}


@click.group("rnnedge", cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rnnedge")
def main() -> None:
    """Export recurrent PyTorch models to stateful step-wise ONNX graphs, prove and run them."""
