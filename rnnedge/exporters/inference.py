"""Inference semantics for the duration of an export or a verify, then every flag back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def inference_mode(model) -> Iterator[None]:
    """``model.eval()`` meanwhile (dropout off, batch norm on its running statistics), then
    each submodule's own ``training`` flag restored: a model may be training with some
    parts frozen in eval on purpose, and a plain ``model.train()`` afterwards would unfreeze
    them. Objects without ``modules()`` / ``eval()`` pass through untouched.
    """
    flags = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
