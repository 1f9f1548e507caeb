"""Example inputs from ``--input-shape`` / ``--input-dtype``."""

from __future__ import annotations

import torch
from torch import nn

from rnnedge.errors import UsageError
from rnnedge.limits import check_shape


def parse_input_shape(text: str) -> tuple:
    """'batch,time,16' -> ('batch', 'time', 16): names are dynamic axes, numbers fixed sizes."""
    axes = []
    for part in (p.strip() for p in text.split(",")):
        if part.isdigit() and int(part) > 0:
            axes.append(int(part))
        elif part in ("batch", "time"):
            axes.append(part)
        else:
            raise UsageError(
                f"--input-shape must be comma-separated axes: 'batch', 'time' (dynamic) or "
                f"positive sizes, e.g. batch,time,16; got {text!r}"
            )
    if "batch" not in axes:
        raise UsageError(f"--input-shape needs a 'batch' axis (e.g. batch,time,16), got {text!r}")
    check_shape(f"--input-shape {text}", [a if isinstance(a, int) else 1 for a in axes],
                show_shape=False)
    return tuple(axes)


def make_example(model: nn.Module, axes: tuple, dtype: str = "float32") -> torch.Tensor:
    """A seeded example input for ``axes`` (dynamic axes get small sizes other than 1).

    'batch' -> 2, 'time' -> 5; int64 tokens are drawn below the model's first
    nn.Embedding's vocabulary size.
    """
    sizes = {"batch": 2, "time": 5}
    shape = [a if isinstance(a, int) else sizes.get(a, 3) for a in axes]
    check_shape("the example input (--input-shape)", shape)  # before allocating it
    gen = torch.Generator().manual_seed(0)
    if dtype == "float32":
        return torch.randn(shape, generator=gen)
    if dtype == "int64":
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), 2)
        return torch.randint(0, vocab, shape, generator=gen)
    raise UsageError(f"--input-dtype must be float32 or int64, got {dtype!r}")
