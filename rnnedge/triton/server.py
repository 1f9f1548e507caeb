"""A running ``tritonserver`` for a model repository: ports, start, readiness, clean stop.

The server runs in its own process group (``start_new_session``), so stopping it also
stops the Python-backend stub processes it started: SIGTERM first (Triton unloads its
models and exits), SIGKILL to the whole group after a grace period. Nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rnnedge.errors import UsageError
from rnnedge.triton.server_env import ServerEnv, ServerError, check_platform, server_environ

LOG_TAIL = 2000  # characters of the server log quoted when it fails to start


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(host: str = "127.0.0.1") -> Ports:
    """Three distinct free ports (the OS's choice)."""
    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return Ports(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def check_ports(ports: Ports, host: str) -> None:
    """UsageError naming the first port that is taken (or repeated)."""
    seen = {}
    for label, port in (("--http-port", ports.http), ("--grpc-port", ports.grpc),
                        ("--metrics-port", ports.metrics)):
        if not 0 < port < 65536:
            raise UsageError(f"{label} {port} is not a port number (1-65535)")
        if port in seen:
            raise UsageError(f"{label} {port} is also {seen[port]}; give each its own port")
        seen[port] = label
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise UsageError(f"port {port} ({label}) on {host} is in use or not allowed "
                                 f"({exc.strerror}); choose another with {label}") from None


@dataclass
class Server:
    """A started tritonserver. urls: {"http", "grpc", "metrics"}; log: its output file."""

    process: subprocess.Popen
    host: str
    ports: Ports
    log: Path

    @property
    def urls(self) -> dict:
        return {"http": f"http://{self.host}:{self.ports.http}",
                "grpc": f"{self.host}:{self.ports.grpc}",
                "metrics": f"http://{self.host}:{self.ports.metrics}/metrics"}

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the process that started it dies (even by
    SIGKILL), so a killed ``rnnedge serve`` leaves no server behind (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(env: ServerEnv, repo, ports: Ports, *, host: str = "127.0.0.1", log=None,
          verbose: bool = False) -> Server:
    """Start tritonserver on ``repo`` (not waiting for it: see ``wait_ready``)."""
    check_platform()
    if not env.binary.is_file():
        raise ServerError(f"no tritonserver binary at {env.binary}; delete {env.root} and run "
                          "again to provision the server environment anew")
    check_ports(ports, host)
    log = Path(log) if log is not None else Path(repo) / "tritonserver.log"
    cmd = [str(env.binary), f"--model-repository={repo}", f"--backend-directory={env.backends}",
           f"--http-address={host}", f"--grpc-address={host}", f"--metrics-address={host}",
           f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
           f"--metrics-port={ports.metrics}", "--exit-on-error=true", "--strict-readiness=true",
           f"--log-verbose={1 if verbose else 0}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=server_environ(env),
                                   start_new_session=True, preexec_fn=_die_with_parent)
    return Server(process, host, ports, log)


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def wait_ready(server: Server, model: str, timeout: float = 120.0) -> None:
    """Block until ``model`` is ready; ServerError (with the log's tail) if the server
    exits or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    url = f"{server.urls['http']}/v2/models/{model}/ready"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"tritonserver exited with code {server.process.returncode} before "
                              f"model {model!r} was ready; its log ends: "
                              f"{_last_error(server.log_tail())}")
        if _get(url) == 200:
            return
        time.sleep(0.2)
    stop(server)
    raise ServerError(f"model {model!r} was not ready after {timeout:g} s; its log ends: "
                      f"{_last_error(server.log_tail())}")


def _last_error(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if "failed to load" in line] or \
        [line for line in lines if line.startswith("E") or "error" in line.lower()]
    return (errors or lines or ["(empty)"])[-1][:400]


def stop(server: Server, grace: float = 15.0) -> int | None:
    """Stop the server and every process of its group; returns its exit code."""
    process = server.process
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the stubs, and the server if still there
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    return process.returncode


def model_config(server: Server, model: str) -> dict:
    """The model's config as the server loaded it (its JSON over HTTP)."""
    with urllib.request.urlopen(f"{server.urls['http']}/v2/models/{model}/config",
                                timeout=5) as response:
        return json.loads(response.read())
