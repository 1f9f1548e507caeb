"""A state_dict (or a checkpoint holding one) loaded into the user's own model class.

``--arch`` names the class as ``module:Class`` or ``path/to/file.py:Class``;
``--arch-kwargs`` gives its constructor's keyword arguments as a JSON object, in which a
string ``"@module:Name"`` or ``"@path/to/file.py:Name"`` (at any depth of lists and
objects) stands for that class or function, imported as ``--arch`` is (the same trust:
importing runs the module's code); ``"@@..."`` is the literal string ``"@..."``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from rnnedge.errors import ModelLoadError, UsageError, first_line

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def from_state(path: Path, obj, arch: str | None, arch_kwargs) -> nn.Module:
    """``arch`` built with ``arch_kwargs`` and loaded with the state_dict ``obj`` holds."""
    state = state_dict_of(path, obj)
    if not arch:
        raise ModelLoadError(
            f"{path} is a state_dict ({len(state)} tensors): it needs the model's class; "
            "pass --arch module:Class or --arch path/to/file.py:Class (and --arch-kwargs '{...}')"
        )
    module = build_arch(arch, arch_kwargs)
    _load_state(module, state, arch)
    return module


def state_dict_of(path: Path, obj) -> dict:
    """``obj`` itself when it is a state_dict, else the one under a checkpoint key."""
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


def build_arch(arch: str, arch_kwargs: str | dict | None = None) -> nn.Module:
    """Instantiate ``module:Class`` or ``path/to/file.py:Class`` with keyword arguments."""
    where, sep, name = arch.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"--arch must look like module:Class or path/to/file.py:Class, got {arch!r}")
    kwargs = parse_kwargs(arch_kwargs)
    mod = import_module(where, f"--arch {arch}", ModelLoadError)
    cls = getattr(mod, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = "nothing" if cls is None else type(cls).__name__
        # Near names, case aside (Grucell -> GRUCell): the module's nn.Module classes.
        modules = {k.lower(): k for k, v in vars(mod).items()
                   if isinstance(v, type) and issubclass(v, nn.Module)}
        near = [modules[k] for k in difflib.get_close_matches(name.lower(), modules, n=3)]
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        raise ModelLoadError(
            f"--arch {arch}: expected an nn.Module subclass named {name} in {where}, "
            f"found {found}{hint}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, MemoryError) as exc:  # the user's constructor
        raise ModelLoadError(
            f"--arch {arch}: {name}(**{kwargs}) failed ({type(exc).__name__}: {first_line(exc)}); "
            "pass the constructor's arguments with --arch-kwargs '{\"name\": value}'"
        ) from None


def import_module(where: str, label: str, error=ModelLoadError):
    """The module ``where``: a dotted module path, or a path/to/file.py run as a module.
    A failure is an ``error`` (one line, starting with ``label``)."""
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise error(f"{label}: file {file} not found; check the path")
            spec = importlib.util.spec_from_file_location(f"rnnedge_arch_{file.stem}", file)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        return importlib.import_module(where)
    except error:
        raise
    except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
        raise error(
            f"{label}: could not import {where} ({type(exc).__name__}: {first_line(exc)}); "
            "check the module path and that its dependencies are installed"
        ) from None


def resolve_reference(text: str, key: str):
    """The class or function ``"@module:Name"`` / ``"@path/to/file.py:Name"`` names, for
    --arch-kwargs entry ``key``; a UsageError (one line, naming the key) when it cannot be."""
    where, sep, name = text[1:].rpartition(":")
    label = f"--arch-kwargs {key}={text}"
    if not sep or not where or not name.isidentifier():
        raise UsageError(f"{label}: a reference must look like @module:Name or "
                         "@path/to/file.py:Name (\"@@...\" for a literal string starting with @)")
    found = getattr(import_module(where, label, UsageError), name, None)
    if found is None or not callable(found):
        what = "nothing" if found is None else f"a {type(found).__name__}"
        raise UsageError(f"{label}: expected a class or function named {name} in {where}, "
                         f"found {what}")
    return found


def resolve_references(value, key: str):
    """``value`` with every "@..." string (in lists and objects too) resolved; "@@..." -> "@..."."""
    if isinstance(value, str) and value.startswith("@@"):
        return value[1:]
    if isinstance(value, str) and value.startswith("@"):
        return resolve_reference(value, key)
    if isinstance(value, list):
        return [resolve_references(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: resolve_references(v, f"{key}.{k}") for k, v in value.items()}
    return value


def parse_kwargs(arch_kwargs) -> dict:
    """``--arch-kwargs`` (a JSON object, a dict or None) as a dict, "@module:Name" strings
    resolved to what they name (``resolve_references``)."""
    if arch_kwargs is None or isinstance(arch_kwargs, dict):
        return {k: resolve_references(v, k) for k, v in (arch_kwargs or {}).items()}
    try:
        value = json.loads(arch_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs must be a JSON object, got {arch_kwargs!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--arch-kwargs must be a JSON object, got {type(value).__name__}")
    return {k: resolve_references(v, k) for k, v in value.items()}


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
