"""``rnnedge demo``: train, export, verify and benchmark a small forecaster, offline."""

from __future__ import annotations

import click

from rnnedge.cli.common import progress_status


@click.command("demo", short_help="Train, export, verify and benchmark a small forecaster.")
@click.option("--out", "out", default="rnnedge-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the model, graph and reports.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds of training.")
@click.option("--quick", is_flag=True, help="A 2-second training budget and a short benchmark (smoke tests).")
@click.option("--cell", type=click.Choice(["lstm", "gru"]), default="lstm", show_default=True,
              help="The forecaster's recurrent layer.")
@click.option("--hidden", type=click.IntRange(min=1), default=32, show_default=True,
              help="The recurrent layer's hidden size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data and training.")
def command(out, budget, quick, cell, hidden, seed):
    """Train a small recurrent forecaster on a synthetic sensor series, export it, prove the
    graph equal to PyTorch, forecast through the runtime and measure it against eager.

    No downloads; under a minute on two cores.
    """
    from rnnedge.demo import print_report, run_demo

    source = click.get_current_context().get_parameter_source("budget")
    if quick and source is click.core.ParameterSource.DEFAULT:
        budget = 2.0  # --quick shortens training unless --budget says otherwise
    with progress_status() as status:
        result = run_demo(out, budget=budget, quick=quick, hidden=hidden, cell=cell, seed=seed,
                          status=status)
    print_report(result)
