"""Safe file writes: checked destinations, then a temporary file beside them and a rename.

A failed write leaves nothing behind and the destination untouched; a reader never sees
half a file; an output never replaces one of the command's own inputs (the same file
through a link included) nor anything that is not a regular file (a device node, a fifo).
Temporary names carry the writer's pid (``.<name>.rnnedge-tmp-<pid>-<random>``), so the
next write to the same destination removes those a killed process left (docs/safety.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from rnnedge.errors import UsageError

#: Between a destination's name and the writer's pid in a temporary name.
TMP_MARK = ".rnnedge-tmp-"

Inputs = Mapping[str, "str | os.PathLike | None"]


def default_mode(directory: bool = False) -> int:
    """The permission bits a plain ``open``/``mkdir`` would give under the current umask.

    mkstemp/mkdtemp create 0600/0700 entries; an exported model must stay readable by the
    server or app that loads it (often another user), as any written file would be.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: through hard or symbolic links when both exist,
    else by their resolved paths (a file about to be created)."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies anywhere under it (links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_not_inputs(dest: str | os.PathLike, inputs: Inputs, what: str = "output") -> None:
    """Refuse an output ``dest`` that is one of ``inputs`` ({label: path}; None skipped)."""
    for label, source in inputs.items():
        if source is not None and str(source) != "" and same_file(dest, source):
            raise UsageError(
                f"refusing to write the {what} {dest}: it is the same file as {label} {source}, "
                "which would be lost; choose another output path"
            )


def check_destination(dest: str | os.PathLike, inputs: Inputs | None = None,
                      what: str = "output") -> Path:
    """Refuse, before any work, a destination that cannot or must not become a file.

    inputs: {label: path} of what the command reads (e.g. {"MODEL": "model.pt"}); an
    output that is one of them is refused, whatever the links in between.
    """
    dest = Path(dest)
    if str(dest) == "":
        raise UsageError(f"the {what} path is empty; give a file path such as model.onnx")
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        mode = os.stat(dest).st_mode  # follows links: a link to a device is a device
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"cannot write {dest}: it is a folder; give a file path such as {dest / 'model.onnx'}")
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(
            f"cannot write {dest}: it is a {_kind(mode)}, not a regular file, and writing would "
            "replace it; give a file path"
        )
    check_writable_folder(folder, str(dest))
    check_not_inputs(dest, inputs or {}, what)
    return dest


def check_writable_folder(folder: str | os.PathLike, what: str,
                          advice: str = "choose another output path") -> None:
    """Refuse (UsageError) writing ``what`` (e.g. a file's path) into ``folder`` when the
    folder does not exist or is not writable; ``advice`` ends the message."""
    if not Path(folder).is_dir():
        raise UsageError(
            f"cannot write {what}: expected an existing folder, found none at {folder}; "
            f"create it first or {advice}"
        )
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {what}: folder {folder} is not writable; {advice}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def write_error(dest: str | os.PathLike, exc: OSError) -> UsageError:
    """The one-line error for a write the machine refused (disk full, quota, I/O error)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UsageError(f"writing {dest} failed ({reason}); nothing was written: free space or "
                      "choose another output path")


def temp_path(dest: Path) -> Path:
    """A fresh temporary name beside ``dest``, marked with this process's pid."""
    return dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing right now
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove temporary files (or folders) for ``dest`` whose writer is no longer running.

    Returns what was removed. A writer on another machine sharing the folder (NFS) looks
    dead here; such setups should not write one destination from two machines anyway.
    """
    dest = Path(dest)
    prefix = f".{dest.name}{TMP_MARK}"
    removed = []
    try:
        entries = list(os.scandir(dest.parent if str(dest.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].partition("-")[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, inputs: Inputs | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; rename it onto ``dest`` on success.

    On any exception the temporary file is removed and ``dest`` is untouched; an OSError
    of the body (disk full) becomes a one-line UsageError. The file gets ``dest``'s current
    permission bits when it exists, else the umask's. inputs: see check_destination.
    """
    dest = check_destination(dest, inputs)
    remove_stale_temps(dest)
    tmp_path = temp_path(dest)
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(
            f"cannot write {dest}: folder {dest.parent} is not writable ({exc.strerror}); "
            "choose another output path"
        ) from None
    os.close(fd)
    try:
        os.chmod(tmp_path, dest.stat().st_mode & 0o7777 if dest.exists() else default_mode())
        try:
            yield tmp_path
        except OSError as exc:  # disk full, I/O error: the machine's problem, said plainly
            raise write_error(dest, exc) from None
        check_destination(dest)  # it may have become a device or folder meanwhile
        try:
            os.replace(tmp_path, dest)
        except OSError as exc:
            raise UsageError(
                f"cannot write {dest} ({exc.strerror}); nothing was written: choose another output path"
            ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes, inputs: Inputs | None = None) -> Path:
    """Write ``data`` to ``dest`` atomically and return ``dest`` as a Path."""
    with atomic_path(dest, inputs) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def replace_together(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (temporary, destination) pair into place: all of them, or none.

    Used for a graph and its external data file. Destinations that exist are kept as hard
    links (a copy where links are not supported) until every rename has succeeded, and put
    back when one fails.
    """
    backups: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, dest in pairs:
            if dest.exists():
                backup = temp_path(dest)
                try:
                    os.link(dest, backup)
                except OSError:
                    shutil.copy2(dest, backup)
                backups.append((backup, dest))
        for tmp, dest in pairs:
            os.replace(tmp, dest)
            placed.append(dest)
    except OSError as exc:
        for dest in placed:
            with contextlib.suppress(OSError):
                dest.unlink()
        for backup, dest in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, dest)
        raise write_error(pairs[-1][1], exc) from None
    finally:
        for backup, _ in backups:
            with contextlib.suppress(OSError):
                backup.unlink()
