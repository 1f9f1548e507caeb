"""Example inputs from ``--input-shape`` / ``--input-dtype``, or ``--input NAME=SHAPE[:DTYPE]``."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from rnnedge.errors import UsageError
from rnnedge.limits import check_shape

DTYPES = ("float32", "int64")


def parse_input_shape(text: str, label: str = "--input-shape") -> tuple:
    """'batch,time,16' -> ('batch', 'time', 16): names are dynamic axes, numbers fixed sizes."""
    axes = []
    for part in (p.strip() for p in text.split(",")):
        if part.isdigit() and int(part) > 0:
            axes.append(int(part))
        elif part in ("batch", "time"):
            axes.append(part)
        else:
            raise UsageError(
                f"{label} must be comma-separated axes: 'batch', 'time' (dynamic) or "
                f"positive sizes, e.g. batch,time,16; got {text!r}"
            )
    if "batch" not in axes:
        raise UsageError(f"{label} needs a 'batch' axis (e.g. batch,time,16), got {text!r}")
    check_shape(f"{label} {text}", [a if isinstance(a, int) else 1 for a in axes],
                show_shape=False)
    return tuple(axes)


def make_example(model: nn.Module, axes: tuple, dtype: str = "float32", seed: int = 0) -> torch.Tensor:
    """A seeded example input for ``axes`` (dynamic axes get small sizes other than 1).

    'batch' -> 2, 'time' -> 5; int64 tokens are drawn below the model's first
    nn.Embedding's vocabulary size.
    """
    sizes = {"batch": 2, "time": 5}
    shape = [a if isinstance(a, int) else sizes.get(a, 3) for a in axes]
    check_shape("the example input (--input-shape)", shape)  # before allocating it
    gen = torch.Generator().manual_seed(seed)
    if dtype == "float32":
        return torch.randn(shape, generator=gen)
    if dtype == "int64":
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), 2)
        return torch.randint(0, vocab, shape, generator=gen)
    raise UsageError(f"--input-dtype must be float32 or int64, got {dtype!r}")


def parse_input(text: str) -> tuple[str, tuple, str]:
    """``--input NAME=SHAPE[:DTYPE]``: 'x=batch,time,80' -> ('x', ('batch', 'time', 80),
    'float32'); 'tokens=batch,time:int64' -> ('tokens', ('batch', 'time'), 'int64')."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise UsageError(f"--input must look like NAME=SHAPE[:DTYPE], e.g. x=batch,time,80 or "
                         f"tokens=batch,time:int64, with NAME a parameter of forward; got {text!r}")
    shape, _, dtype = rest.partition(":")
    dtype = dtype.strip() or "float32"
    if dtype not in DTYPES:
        raise UsageError(f"--input {text}: the dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name, parse_input_shape(shape, f"--input {name}"), dtype


def forward_order(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (from --input) in the order of forward's parameters; a UsageError, listing
    them, for a name that is not one (none is checked when forward takes ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return list(names)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        return list(names)
    order = list(params)
    unknown = [n for n in names if n not in order]
    if unknown:
        raise UsageError(f"--input {unknown[0]} is not a parameter of {type(model).__name__}.forward, "
                         f"which takes ({', '.join(order)}); name each --input after one of them")
    return sorted(names, key=order.index)


def make_examples(model: nn.Module, specs: list[tuple[tuple, str]]) -> tuple[torch.Tensor, ...]:
    """One seeded example per (axes, dtype), as ``make_example`` makes one; each input
    draws from its own seed, so that two inputs of one shape differ."""
    return tuple(make_example(model, axes, dtype, seed=k) for k, (axes, dtype) in enumerate(specs))
