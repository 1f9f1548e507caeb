"""TorchScript archives: a bare recurrent layer or cell, rebuilt as the eager module.

Compiled code cannot be re-traced, but a bare nn.RNN/LSTM/GRU (or cell) is fully
described by its hyper-parameters and weights (``rnnedge.recurrent.rebuild``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from rnnedge.errors import ModelLoadError, first_line
from rnnedge.recurrent import BY_NAME, hyper_parameters, rebuild


def from_torchscript(path: Path) -> nn.Module:
    """The archive at ``path`` (a scripted bare layer or cell) as an eager module."""
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript; users still ship it, and we only read it.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} is a damaged TorchScript archive ({first_line(exc)}); save it again") from None
    name = getattr(scripted, "original_name", type(scripted).__name__)
    layer = BY_NAME.get(name)
    if layer is None:
        raise ModelLoadError(
            f"{path} is a TorchScript archive of {name}: rnnedge re-exports TorchScript only for "
            "bare nn.RNN/LSTM/GRU and cells (compiled code cannot be re-traced); for a model built "
            "around them, save model.state_dict() and pass --arch module:Class"
        )
    return rebuild(layer, hyper_parameters(layer, scripted), dict(scripted.state_dict()),
                   where=str(path))
