"""torch.save files: tensors only by default; a pickled whole module only when trusted."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from rnnedge.errors import ModelLoadError, first_line

SAFER = ("save model.state_dict() and pass --arch module:Class, or save a TorchScript "
         "archive (torch.jit.save) or a torch.export program (.pt2)")


def torch_load(path: Path, trust_pickle: bool):
    """What torch.save wrote to ``path`` (already checked by ``check_model_file``).

    Loaded with ``weights_only`` first; anything else needs ``trust_pickle``, since
    unpickling runs code from the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ModelLoadError(
                f"{path} is not a readable PyTorch file ({first_line(exc)}); "
                "expected torch.save output, a TorchScript archive or a .pt2 program"
            ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes torch.load raise anything
        raise ModelLoadError(
            f"{path} is not a readable PyTorch file (corrupt or truncated: {first_line(exc)}); "
            "expected torch.save output, a TorchScript archive or a .pt2 program; save it again"
        ) from None
    if not trust_pickle:
        raise ModelLoadError(
            f"{path} is a pickled object (a whole saved module): loading it runs code from the "
            f"file, so rnnedge refuses by default; pass --trust-pickle if you trust it, or {SAFER}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything the file's code does
        raise ModelLoadError(
            f"unpickling {path} failed ({type(exc).__name__}: {first_line(exc)}); the classes it "
            f"names must be importable here (run from the project that defines them), or {SAFER}"
        ) from None
