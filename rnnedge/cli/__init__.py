"""The ``rnnedge`` command: thin wrappers over the library, one clear line per error.

Exit codes: 0 success, 1 a failed export/verification/run, 2 a usage error.
Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import click

from rnnedge import __version__
from rnnedge.cli.common import lazy_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rnnedge")
def main() -> None:
    """Export recurrent PyTorch models to stateful step-wise ONNX graphs, prove and run them."""


# Commands import their heavy dependencies (torch) only when run.
for _name, _module, _help in (
    ("export", "rnnedge.cli.export_cmd", "Export a model to a stateful ONNX graph, proven by the parity gate."),
    ("inspect", "rnnedge.cli.inspect_cmd", "Print an exported graph's contract."),
    ("verify", "rnnedge.cli.verify_cmd", "Re-run the parity gate of a graph against its PyTorch model."),
    ("bench", "rnnedge.cli.bench_cmd", "Measure per-step latency of a graph (and eager PyTorch)."),
    ("demo", "rnnedge.cli.demo_cmd", "Train, export, verify and benchmark a small forecaster."),
):
    main.add_command(lazy_command(_name, _module, _help))
