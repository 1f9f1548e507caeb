"""``rnnedge inspect OUT.onnx``: the graph's contract, as a table or JSON. No torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rnnedge.cli.common import handles_errors
from rnnedge.errors import ContractError, UsageError


def read_contract(path: Path) -> dict:
    import onnx

    if not path.is_file():
        raise UsageError(f"{path} not found: expected an ONNX file written by rnnedge export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds
        raise UsageError(f"{path} is not a readable ONNX file ({type(exc).__name__}); check the path") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "rnnedge" not in props:
        names = ", ".join(i.name for i in model.graph.input)
        raise ContractError(
            f"{path} has no rnnedge metadata (inputs: {names}): it was not written by rnnedge "
            "export; rnnedge.load(path, state_map=...) can still run it"
        )
    from rnnedge.runtime import load

    # The runtime's reader refuses what apps would trip on: an unknown format, missing or
    # malformed entries, names and shapes that do not match the graph.
    try:
        return load(path, device="cpu").contract.metadata
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from None


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


@click.command("inspect")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the contract as JSON.")
@handles_errors
def command(graph_path: Path, as_json: bool):
    """Print GRAPH's contract: inputs, outputs, state pairs, mode and parity figures."""
    meta = read_contract(graph_path)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{graph_path.name}: {meta.get('mode')} mode, time axis "
                        f"{meta.get('time_axis')}, opset {meta.get('opset')}")
    for col in ("role", "name", "dtype", "shape", "pairs with"):
        table.add_column(col)
    for item in meta.get("inputs", []):
        table.add_row("input", item["name"], item["dtype"], _shape(item["shape"]), "")
    for item in meta.get("outputs", []):
        table.add_row("output", item["name"], item["dtype"], _shape(item["shape"]), "")
    for s in meta.get("states", []):
        table.add_row("state", s["input"], s["dtype"], _shape(s["shape"]),
                      f"-> {s['output']} (batch axis {s['batch_axis']}, init {s['init']})")
    console = Console(width=120)
    console.print(table)
    source, parity = meta.get("source", {}), meta.get("parity", {})
    console.print(f"source: {source.get('class')} (torch {source.get('torch')})")
    if parity:
        line = (f"parity: {parity.get('cases')} cases, max abs {_num(parity.get('max_abs'))}, "
                f"max rel {_num(parity.get('max_rel'))}")
        if parity.get("precision", "fp32") != "fp32":
            line += (f"; {parity['precision']} graph proven on {parity.get('device')}: drift "
                     f"{_num(parity.get('drift'))} (limit {parity.get('drift_limit')}), steps within "
                     f"atol {parity.get('atol')}, rtol {parity.get('rtol')}")
        console.print(line)
