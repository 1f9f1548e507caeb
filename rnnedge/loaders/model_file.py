"""Load a model file the way its author saved it, safely by default.

Forms: a state_dict or checkpoint dict (with ``arch``, see ``arch``), a TorchScript
archive (``torchscript``), a ``torch.export`` ``.pt2`` program (``pt2``), or a pickled
whole module (only with ``trust_pickle``: unpickling runs code from the file, see
``pickles``). Every failure is a ``ModelLoadError`` saying what was expected, what was
found, and what to do.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from torch import nn

from rnnedge.errors import ModelLoadError
from rnnedge.loaders.arch import from_state
from rnnedge.loaders.integrity import check_finite_weights, check_zip_members
from rnnedge.loaders.pickles import torch_load
from rnnedge.loaders.pt2 import load_program
from rnnedge.loaders.torchscript import from_torchscript


def check_model_file(path: Path) -> str:
    """The form of the model file at ``path``: 'torchscript', 'pt2', 'torch' (torch.save
    zip) or 'legacy' (torch.save's older non-zip pickle).

    Every model file passes through here before any torch loader opens it: checks on the
    file's own bytes belong here.
    """
    if not path.is_file():
        raise ModelLoadError(
            f"model file {path} not found: expected a .pt/.pth/.pt2 file; check the path"
        )
    kind = _archive_kind(path)
    check_zip_members(path)  # torch's readers ignore the CRCs: a flipped bit would load
    if kind in ("torch", "legacy"):
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip ("PK") or, in the legacy format, a pickle (protocol >= 2
        # starts with 0x80); anything else is not a PyTorch file, whatever torch.load says.
        if head[:1] != b"\x80" and head != b"PK":
            hint = " (it looks like an ONNX graph: MODEL is the PyTorch model)" if path.suffix == ".onnx" else ""
            raise ModelLoadError(
                f"{path} is not a PyTorch file{hint}: expected torch.save output, a TorchScript "
                "archive or a .pt2 program"
            )
    return kind


def _archive_kind(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        return "legacy"
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path} is a damaged zip archive ({exc}); save the model again") from None
    if any("/code/__torch__/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("models/model.json") or n.endswith("serialized_exported_program.json")
           for n in names):
        return "pt2"
    return "torch"


def load_model(path, *, arch: str | None = None, arch_kwargs: str | dict | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """Load ``path`` into an eval-mode float32 ``nn.Module``.

    arch: 'module:Class' or 'path/to/file.py:Class', needed for a state_dict; arch_kwargs:
    its constructor's keyword arguments (a dict or a JSON object); trust_pickle: allow
    unpickling a whole saved module (runs code from the file).
    """
    path = Path(path)
    kind = check_model_file(path)
    if kind == "torchscript":
        module = from_torchscript(path)
    elif kind == "pt2":
        module = load_program(path)
    else:
        obj = torch_load(path, trust_pickle)
        module = obj if isinstance(obj, nn.Module) else from_state(path, obj, arch, arch_kwargs)
    if arch and not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path} did not give a module")
    check_finite_weights(module, str(path))  # NaN/inf weights named here, not blamed later
    return module.eval()
