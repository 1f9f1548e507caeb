"""Atomic file writes: a temporary file beside the destination, then a rename.

A failed export must leave nothing behind, and a reader must never see half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rnnedge.errors import ExportError, UsageError


def default_mode(directory: bool = False) -> int:
    """The permission bits a plain ``open``/``mkdir`` would give under the current umask.

    mkstemp/mkdtemp create 0600/0700 entries; an exported model must stay readable by the
    server or app that loads it (often another user), as any written file would be.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_destination(dest: str | os.PathLike) -> Path:
    """Refuse, before any work, a destination that cannot become a file."""
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise UsageError(f"cannot write {dest}: it is a folder; give a file path such as {dest / 'model.onnx'}")
    if not folder.is_dir():
        raise UsageError(
            f"cannot write {dest}: expected an existing folder, found none at {folder}; "
            "create it first or choose another output path"
        )
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {dest}: folder {folder} is not writable; choose another output path")
    return dest


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; rename it onto ``dest`` on success.

    On any exception the temporary file is removed and ``dest`` is untouched. The file
    gets ``dest``'s current permission bits when it exists, else the umask's.
    """
    dest = check_destination(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise UsageError(
            f"cannot write {dest}: folder {dest.parent} is not writable ({exc.strerror}); "
            "choose another output path"
        ) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, dest.stat().st_mode & 0o7777 if dest.exists() else default_mode())
        try:
            yield tmp_path
        except OSError as exc:  # disk full, I/O error: the machine's problem, said plainly
            raise ExportError(
                f"writing {dest} failed ({exc.strerror or exc}); nothing was written: free space "
                "or choose another output path"
            ) from None
        try:
            os.replace(tmp_path, dest)
        except OSError as exc:
            raise UsageError(
                f"cannot write {dest} ({exc.strerror}); nothing was written: choose another output path"
            ) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically and return ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)
