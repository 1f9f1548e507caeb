"""Export targets: each thing an export writes, built and proven, and how it is put in
place — every target staged in one ExitStack, so they land both or neither."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnedge.files import write_bytes_atomic, write_error
from rnnedge.graphs import external


@dataclass(frozen=True)
class Target:
    """One thing to write, built and proven. kind: "graph" (the graph file at ``path``)
    or "triton" (the model folder ``name`` in the repository at ``path``)."""

    kind: str
    path: Path
    data: bytes  # the serialized model; b"" when its weights go to external data
    model: onnx.ModelProto | None = None  # graph: with its metadata, for external data
    stage: external.Stage | None = None  # graph: where its weights are staged, if they are
    name: str = ""  # Triton: the model's name (its folder)
    config: str = ""  # Triton: config.pbtxt
    cases: list = field(default_factory=list)  # Triton: its own gate results
    extra: dict = field(default_factory=dict)  # Triton: more files, {relative path: bytes}


@dataclass(frozen=True)
class Written:
    path: Path  # the graph file, or the Triton model folder
    size: int  # bytes written (the graph file and its external data; 0 for Triton)


def write(targets: list[Target]) -> dict[str, Written]:
    """Put every target in place, in order, both or neither: each is staged in one
    ExitStack, so a failure of a later one rolls back the earlier ones."""
    written = {}
    with contextlib.ExitStack() as stack:
        for target in targets:
            written[target.kind] = stack.enter_context(PUT[target.kind](target))
    return written


@contextlib.contextmanager
def _put_triton(target: Target) -> Iterator[Written]:
    from rnnedge.triton import repository as triton

    staged = contextlib.ExitStack()
    try:
        folder = staged.enter_context(
            triton.staged_repository(target.path, target.name, target.data, target.config,
                                     extra=target.extra))
    except OSError as exc:  # a full disk: one line, exit 2, nothing left behind
        raise write_error(target.path, exc) from None
    with staged:  # rolled back if a later target cannot be put in place
        yield Written(folder, 0)


@contextlib.contextmanager
def _put_graph(target: Target) -> Iterator[Written]:
    # An atomic rename (of both files with external data): nothing is left to roll back,
    # which is why the graph file is the last target.
    if target.data:
        write_bytes_atomic(target.path, target.data)
        size = len(target.data)
    elif target.stage is not None:
        size = external.commit_staged(target.model, target.stage)
    else:
        size = external.write_with_external_data(target.path, target.model)
    yield Written(target.path, size)


#: How each kind of target is put in place: a context manager yielding ``Written``.
PUT = {"triton": _put_triton, "graph": _put_graph}
