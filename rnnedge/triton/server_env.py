"""The server side of ``rnnedge serve``: a python environment with Triton in it, made once.

Triton's server binary comes from the ``nvidia-pytriton`` wheel (``pytriton/tritonserver/``:
``bin/tritonserver``, its libraries in ``nvidia_pytriton.libs/``, the Python backend and a
backend stub per Python version). It needs numpy < 2 (and the Python-backend stub, with
numpy 2, answers every request "output tensor shape does not match size"), so it gets its
own virtual environment instead of downgrading the user's: created once with
``python -m venv`` + pip and cached in ``~/.cache/rnnedge/triton-<version>/`` (or
``$RNNEDGE_CACHE``). rnnedge itself is not installed there: the model's ``sys.path``
gets rnnedge's source folder (config parameter RNNEDGE_PATH), so the server runs the
same rnnedge as the client.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rnnedge.errors import RnnedgeError

PYTRITON_VERSION = "0.7.0"
REQUIREMENTS = (f"nvidia-pytriton=={PYTRITON_VERSION}", "numpy<2", "onnxruntime>=1.20,<2")
READY = ".rnnedge-ready"  # written last: a half-made environment is made again


class ServerError(RnnedgeError):
    """The Triton server could not be provisioned, started or kept running."""


@dataclass(frozen=True)
class ServerEnv:
    """A provisioned server environment. root: the cache folder; python: its interpreter;
    site: its site-packages; binary: tritonserver; libs: the folder for LD_LIBRARY_PATH;
    backends: a --backend-directory with ``python/`` (backend, utils, matching stub)."""

    root: Path
    python: Path
    site: Path
    binary: Path
    libs: Path
    backends: Path


def check_platform() -> None:
    """The wheel is manylinux x86-64 only."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        raise ServerError(
            f"rnnedge serve needs Linux x86-64 (Triton's nvidia-pytriton wheel), this is "
            f"{sys.platform} {machine}; use the onnxruntime repository (rnnedge export "
            "--triton-repo) in NVIDIA's Triton container instead")


def cache_root() -> Path:
    base = os.environ.get("RNNEDGE_CACHE") or Path.home() / ".cache" / "rnnedge"
    return Path(base) / f"triton-{PYTRITON_VERSION}"


def _site(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def locate(root: Path | None = None) -> ServerEnv:
    """The ServerEnv at ``root`` (default ``cache_root()``), whether made or not."""
    root = Path(root) if root is not None else cache_root()
    venv = root / "venv"
    site = _site(venv)
    server = site / "pytriton" / "tritonserver"
    return ServerEnv(root, venv / "bin" / "python", site, server / "bin" / "tritonserver",
                     site / "nvidia_pytriton.libs", root / "backends")


def is_ready(env: ServerEnv) -> bool:
    return (env.root / READY).is_file() and env.binary.is_file()


def provision(root: Path | None = None, progress=None) -> ServerEnv:
    """The server environment, made now if it is not there yet (a ~370 MB pip install,
    one time); concurrent callers wait for one another on a lock file."""
    import fcntl

    check_platform()
    env = locate(root)
    if is_ready(env):
        return env
    env.root.mkdir(parents=True, exist_ok=True)
    with open(env.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(env):  # made by whoever held the lock
            return env
        note = progress or (lambda text: None)
        note(f"provisioning the Triton server environment in {env.root} (one time, ~370 MB)")
        shutil.rmtree(env.root / "venv", ignore_errors=True)
        shutil.rmtree(env.backends, ignore_errors=True)
        _run([_base_python(), "-m", "venv", str(env.root / "venv")], "create a venv")
        _run([str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              *REQUIREMENTS], "pip install " + " ".join(REQUIREMENTS))
        _backend_folder(env)
        (env.root / READY).write_text(" ".join(REQUIREMENTS) + "\n")
    return env


def _base_python() -> str:
    # The stub embeds this Python version's libpython; the venv must be of the same version.
    return getattr(sys, "_base_executable", None) or sys.executable


def _run(cmd: list, what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-1:])
        raise ServerError(f"could not provision the Triton server environment ({what}): "
                          f"{tail or 'exit ' + str(result.returncode)}; check network access "
                          "to the package index, or set RNNEDGE_CACHE to a writable folder")


def _backend_folder(env: ServerEnv) -> None:
    """``backends/python/``: the Python backend and the stub built for this Python."""
    server = env.site / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton {PYTRITON_VERSION} has no Python-backend stub for "
                          f"Python {version}; run rnnedge with Python 3.8-3.13")
    folder = env.backends / "python"
    folder.mkdir(parents=True, exist_ok=True)
    backend = server / "backends" / "python"
    for source in (backend / "libtriton_python.so", stub):
        shutil.copy2(source, folder / source.name)
    # The stub's embedded Python ignores PYTHONPATH; the utils module is the first thing it
    # imports (and it imports numpy), so the server venv's packages are put first from there.
    utils = (backend / "triton_python_backend_utils.py").read_text()
    header = (f"# rnnedge: the server environment's packages (numpy < 2) first.\n"
              f"import sys as _rnnedge_sys\n_rnnedge_sys.path.insert(0, {str(env.site)!r})\n")
    (folder / "triton_python_backend_utils.py").write_text(header + utils)


def rnnedge_source() -> Path:
    """The folder holding the ``rnnedge`` package (put on the model's sys.path)."""
    return Path(__file__).resolve().parents[2]


def server_environ(env: ServerEnv) -> dict:
    """The environment tritonserver runs in: its libraries on LD_LIBRARY_PATH; the user's
    PYTHONPATH dropped (the stub's packages come from the server venv: ``_backend_folder``)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    libs = [str(env.libs)] + [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    environ["LD_LIBRARY_PATH"] = ":".join(libs)
    environ["PYTHONNOUSERSITE"] = "1"
    return environ
