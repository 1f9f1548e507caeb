"""A Triton Inference Server model repository for an rnnedge graph: names, folders, writes.

Layout written (onnxruntime backend)::

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx

The graph is the batch-first variant (``variant.py``), the config ``config.py``'s text.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from rnnedge.errors import UsageError
from rnnedge.files import check_writable_folder

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_name(name) -> str:
    """A Triton model name: letters, digits, '_' and '-' only (it is a folder name)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        hint = re.sub(r"[^A-Za-z0-9_-]", "_", str(name)).strip("_") or "model"
        raise UsageError(
            f"Triton model name {name!r} is not valid: use letters, digits, '_' and '-' only "
            f"(it names the model's folder); e.g. --triton-name {hint}"
        )
    return name


def check_target(repo, name: str) -> Path:
    """Refuse, before any work, a repository folder that cannot be written."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"Triton repository {repo} is a file; give a folder (it may not exist yet)")
    parent = repo if repo.is_dir() else repo.parent
    check_writable_folder(parent, f"Triton repository {repo}", "choose another --triton-repo")
    return repo / name


@contextlib.contextmanager
def staged_repository(repo, name: str, model_bytes: bytes, config: str,
                      extra: dict | None = None):
    """Put ``repo/name/{config.pbtxt,1/model.onnx}`` in place; yields the model folder.

    extra: {path relative to the model folder: bytes}, more files (e.g. ``1/model.py``).

    Built in a hidden temporary folder inside ``repo`` and renamed into place, so a reader
    (or a polling Triton) sees the old model folder or the new one, never half of one; an
    existing ``repo/name`` is replaced as a whole. ``repo`` itself is created if missing.
    If the body of the ``with`` raises (e.g. the graph file beside it cannot be written),
    everything is rolled back: the previous model folder returns, a created repo goes.
    """
    from rnnedge.files import default_mode, remove_stale_temps, temp_path

    dest = check_target(repo, check_name(name))
    repo = dest.parent
    created = not repo.exists()
    if created:
        repo.mkdir()
    remove_stale_temps(dest)  # what an export killed while writing here left behind
    tmp = temp_path(dest)
    old, placed = None, False
    try:
        tmp.mkdir()
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would hide it from Triton
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(model_bytes)
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        for relative, content in (extra or {}).items():
            (tmp / relative).write_bytes(content)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=repo))
            old.rmdir()
            os.replace(dest, old)
        os.replace(tmp, dest)
        placed = True
        yield dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if placed:
            shutil.rmtree(dest, ignore_errors=True)
        if old is not None and old.exists():
            os.replace(old, dest)  # put the previous model back
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_repository(repo, name: str, model_bytes: bytes, config: str) -> Path:
    """Write ``repo/name/{config.pbtxt,1/model.onnx}`` atomically; returns the model folder."""
    with staged_repository(repo, name, model_bytes, config) as dest:
        return dest
