"""``rnnedge inspect OUT.onnx``: the graph's contract, as a table or JSON. No torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from rnnedge.contract import ExportSpec, from_json
from rnnedge.errors import ContractError, UsageError


def read_contract(path: Path) -> ExportSpec:
    """GRAPH's contract, validated as ``rnnedge.load`` validates it (format, entries, and the
    graph's own input/output names, dtypes and sizes), without an onnxruntime session."""
    import onnx

    from rnnedge.graphs.metadata import read_metadata
    from rnnedge.runtime.contract import GraphIO, check_spec

    if not path.is_file():
        raise UsageError(f"{path} not found: expected an ONNX file written by rnnedge export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds
        raise UsageError(f"{path} is not a readable ONNX file ({type(exc).__name__}); check the path") from None
    text = read_metadata(model)
    if text is None:
        names = ", ".join(i.name for i in model.graph.input)
        raise ContractError(
            f"{path} has no rnnedge metadata (inputs: {names}): it was not written by rnnedge "
            "export; rnnedge.load(path, state_map=...) can still run it"
        )

    def io(value) -> GraphIO:
        t = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None  # not a tensor numpy holds: only the names are compared
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.shape.dim) if t.HasField("shape") else ()
        return GraphIO(value.name, dtype, str(t.elem_type), dims)

    weights = {i.name for i in model.graph.initializer}  # old IRs list them as inputs too
    try:
        spec = from_json(text)
        check_spec(spec, [io(v) for v in model.graph.input if v.name not in weights],
                   [io(v) for v in model.graph.output])
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from None
    return spec


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


@click.command("inspect", short_help="Print an exported graph's contract.")
@click.argument("graph_path", metavar="GRAPH", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the contract as JSON.")
def command(graph_path: Path, as_json: bool):
    """Print GRAPH's contract: inputs, outputs, state pairs, mode and parity figures."""
    spec = read_contract(graph_path)
    if as_json:
        click.echo(json.dumps(spec.metadata(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{graph_path.name}: {spec.mode} mode, time axis {spec.time_axis}, "
                        f"opset {spec.opset}")
    for col in ("role", "name", "dtype", "shape", "pairs with"):
        table.add_column(col)
    for role, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for t in tensors:
            note = f"ids in [{t.range[0]}, {t.range[1]})" if t.range else ""
            if t.end_offset is not None:  # frames for a whole stream of N steps
                c = t.end_offset if isinstance(t.end_offset, int) else "/".join(map(str, t.end_offset))
                r = t.time_ratio if isinstance(t.time_ratio, int) else "/".join(map(str, t.time_ratio))
                note = f"floor(N*{r} + {c}) steps for N input steps"
            table.add_row(role, t.name, t.dtype, _shape(t.shape), note)
    for s in spec.states:
        table.add_row("state", s.input, s.dtype, _shape(s.shape),
                      f"-> {s.output} (batch axis {s.batch_axis}, init {s.init})")
    console = Console(width=120)
    console.print(table)
    caches = [s.input for s in spec.states if s.input.endswith(".cache0")]
    if caches or spec.chunk_multiple != 1 or spec.latency:
        m = spec.chunk_multiple
        chunks = (f"chunks: first \u2261 {spec.chunk_offset} (mod {m}) steps, then multiples "
                  f"of {m};" if spec.chunk_offset else f"chunks of a multiple of {m} steps,")
        end = (f"; the model ends a whole input at its own length \u2261 {spec.model_end[0]} "
               f"(mod {m}), at least {spec.model_end[1]} (a flush pads to it)"
               if spec.model_end else "")
        console.print(f"streaming: {chunks} latency {spec.latency} steps, {len(caches)} conv "
                      f"cache state(s){end}")
    source, parity = spec.source, spec.parity
    if isinstance(source, dict):
        console.print(f"source: {source.get('class')} (torch {source.get('torch')})")
    elif source:
        console.print(f"source: {source}")
    if parity:
        line = (f"parity: {parity.get('cases')} cases, max abs {_num(parity.get('max_abs'))}, "
                f"max rel {_num(parity.get('max_rel'))}")
        if parity.get("precision", "fp32") != "fp32":
            line += (f"; {parity.get('precision')} graph proven on {parity.get('device')}: drift "
                     f"{_num(parity.get('drift'))} (limit {parity.get('drift_limit')}), steps within "
                     f"atol {parity.get('atol')}, rtol {parity.get('rtol')}")
        if parity.get("referee"):
            line += f"; referee {parity['referee']}"
        console.print(line)
        nan = parity.get("nan_propagates")
        if nan is not None:  # null: not probed
            console.print("NaN input: propagates" if nan else "NaN input: does not propagate "
                          "(the runtime refuses NaN/inf by default)")
