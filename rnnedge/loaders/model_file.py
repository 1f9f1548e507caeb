"""Load a model file the way its author saved it, safely by default.

Forms: a state_dict or checkpoint dict (with ``arch``), a TorchScript archive, a
``torch.export`` ``.pt2`` program, or a pickled whole module (only with
``trust_pickle``: unpickling runs code from the file). Every failure is a
``ModelLoadError`` saying what was expected, what was found, and what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from rnnedge.errors import ModelLoadError, UsageError, first_line

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
SAFER = ("save model.state_dict() and pass --arch module:Class, or save a TorchScript "
         "archive (torch.jit.save) or a torch.export program (.pt2)")


def _archive_kind(path: Path) -> str:
    """'torchscript', 'pt2', 'torch' (torch.save zip) or 'legacy' (non-zip file)."""
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
    """Load ``path`` into an eval-mode float32 ``nn.Module``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"model file {path} not found: expected a .pt/.pth/.pt2 file; check the path"
        )
    kind = _archive_kind(path)
    if kind == "torchscript":
        module = _from_torchscript(path)
    elif kind == "pt2":
        module = _from_exported_program(path)
    else:
        obj = _torch_load(path, trust_pickle)
        module = obj if isinstance(obj, nn.Module) else _from_state(path, obj, arch, arch_kwargs)
    if arch and not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path} did not give a module")
    return module.eval()


def _torch_load(path: Path, trust_pickle: bool):
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



def _state_dict_of(path: Path, obj) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise ModelLoadError(
        f"{path} holds a {type(obj).__name__}, not a module or state_dict: expected a state_dict "
        f"or a checkpoint with one of the keys {', '.join(CHECKPOINT_KEYS)}; save model.state_dict()"
    )


def _from_state(path: Path, obj, arch: str | None, arch_kwargs) -> nn.Module:
    state = _state_dict_of(path, obj)
    if not arch:
        raise ModelLoadError(
            f"{path} is a state_dict ({len(state)} tensors): it needs the model's class; "
            "pass --arch module:Class or --arch path/to/file.py:Class (and --arch-kwargs '{...}')"
        )
    module = build_arch(arch, arch_kwargs)
    _load_state(module, state, arch)
    return module


def build_arch(arch: str, arch_kwargs: str | dict | None = None) -> nn.Module:
    """Instantiate ``module:Class`` or ``path/to/file.py:Class`` with keyword arguments."""
    where, sep, name = arch.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"--arch must look like module:Class or path/to/file.py:Class, got {arch!r}")
    kwargs = _parse_kwargs(arch_kwargs)
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise ModelLoadError(f"--arch file {file} not found; check the path")
            spec = importlib.util.spec_from_file_location(f"rnnedge_arch_{file.stem}", file)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
        raise ModelLoadError(
            f"--arch {arch}: could not import {where} ({type(exc).__name__}: {first_line(exc)}); "
            "check the module path and that its dependencies are installed"
        ) from None
    cls = getattr(mod, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = "nothing" if cls is None else type(cls).__name__
        raise ModelLoadError(
            f"--arch {arch}: expected an nn.Module subclass named {name} in {where}, found {found}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(
            f"--arch {arch}: {name}(**{kwargs}) failed ({first_line(exc)}); pass the constructor's "
            "arguments with --arch-kwargs '{\"name\": value}'"
        ) from None


def _parse_kwargs(arch_kwargs) -> dict:
    if arch_kwargs is None or isinstance(arch_kwargs, dict):
        return dict(arch_kwargs or {})
    try:
        value = json.loads(arch_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs must be a JSON object, got {arch_kwargs!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--arch-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _load_state(module: nn.Module, state: dict, arch: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch (file vs arch)", mismatched)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(
            f"the state_dict does not fit --arch {arch}: " + "; ".join(parts)
            + "; check --arch and --arch-kwargs (sizes, layers) against the saved model"
        )
    module.load_state_dict(state)


# Rebuilding standard layers: TorchScript and torch.export programs cannot be re-traced,
# but a bare recurrent layer is fully described by its hyper-parameters and weights.
_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "LSTMCell": nn.LSTMCell,
           "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}
_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
           "bidirectional", "proj_size", "nonlinearity")


_STACK_ARGS = {"input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional"}
_ACCEPTED = {
    "LSTM": _STACK_ARGS | {"proj_size"}, "GRU": _STACK_ARGS, "RNN": _STACK_ARGS | {"nonlinearity"},
    "LSTMCell": {"input_size", "hidden_size", "bias"}, "GRUCell": {"input_size", "hidden_size", "bias"},
    "RNNCell": {"input_size", "hidden_size", "bias", "nonlinearity"},
}


def _rebuild(name: str, config: dict, state: dict) -> nn.Module:
    cls = _LAYERS[name]
    module = cls(**{k: v for k, v in config.items() if k in _ACCEPTED[name]})
    module.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return module


def _from_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript; users still ship it, and we only read it.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} is a damaged TorchScript archive ({first_line(exc)}); save it again") from None
    name = getattr(scripted, "original_name", type(scripted).__name__)
    if name not in _LAYERS:
        raise ModelLoadError(
            f"{path} is a TorchScript archive of {name}: rnnedge re-exports TorchScript only for "
            "bare nn.RNN/LSTM/GRU and cells (compiled code cannot be re-traced); for a model built "
            "around them, save model.state_dict() and pass --arch module:Class"
        )
    config = {k: getattr(scripted, k) for k in _CONFIG if hasattr(scripted, k)}
    if name == "RNN" and getattr(scripted, "mode", "") == "RNN_RELU":
        config["nonlinearity"] = "relu"
    return _rebuild(name, config, dict(scripted.state_dict()))


def _from_exported_program(path: Path) -> nn.Module:
    """A .pt2 program: its recurrent layers rebuilt as nn.LSTM/GRU/RNN (see rnnedge.loaders.pt2)."""
    from rnnedge.loaders.pt2 import load_program

    return load_program(path)


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
    return tuple(axes)


def make_example(model: nn.Module, axes: tuple, dtype: str = "float32") -> torch.Tensor:
    """A seeded example input for ``axes`` (dynamic axes get small sizes other than 1)."""
    sizes = {"batch": 2, "time": 5}
    shape = [a if isinstance(a, int) else sizes.get(a, 3) for a in axes]
    gen = torch.Generator().manual_seed(0)
    if dtype == "float32":
        return torch.randn(shape, generator=gen)
    if dtype == "int64":
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), 2)
        return torch.randint(0, vocab, shape, generator=gen)
    raise UsageError(f"--input-dtype must be float32 or int64, got {dtype!r}")
