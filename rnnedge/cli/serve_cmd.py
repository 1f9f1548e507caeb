"""``rnnedge serve MODEL.onnx``: the graph on a live Triton server (Python backend), in the foreground."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import click


class _Stop(Exception):
    """SIGTERM, turned into an exception so the server is stopped on the way out."""


def _on_sigterm(_signum, _frame):
    raise _Stop()


@click.command("serve", short_help="Serve a graph on a live Triton server, stateful per sequence.")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--http-port", type=int, default=8000, show_default=True, help="HTTP/REST port.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (processes); each sequence stays on one.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Most sequences stepped in one batched call.")
@click.option("--threads", type=click.IntRange(0, 256), default=1, show_default=True,
              help="onnxruntime threads per instance (0: one per core).")
@click.option("--idle-timeout", type=click.FloatRange(0.001, 86400), default=60.0, show_default=True,
              help="Seconds after which a silent sequence is dropped and its state freed.")
@click.option("--name", default=None, help="The model's name on the server (default: the file's stem).")
@click.option("--log", "log", type=click.Path(dir_okay=False), default=None,
              help="Keep the server's log in this file (default: a temporary file).")
def command(model_path, http_port, grpc_port, metrics_port, host, instances, max_batch, threads,
            idle_timeout, name, log):
    """Serve MODEL.onnx (an rnnedge graph) on Triton Inference Server until Ctrl-C.

    Each sequence's state stays on the server, keyed by the request's sequence_id: send
    sequence_start=True on its first request and sequence_end=True on its last. The server
    environment (Triton and numpy < 2, ~370 MB) is installed once, in ~/.cache/rnnedge.
    """
    from rnnedge.errors import UsageError
    from rnnedge.triton import check_name, server, server_env
    from rnnedge.triton.python_backend import write_python_repository

    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"no model file {model_path}; give an .onnx graph written by rnnedge export")
    name = check_name(name if name is not None else path.stem)
    ports = server.Ports(http_port, grpc_port, metrics_port)
    server_env.check_platform()
    server.check_ports(ports, host)
    env = server_env.provision(progress=lambda text: click.echo(text, err=True))
    with tempfile.TemporaryDirectory(prefix="rnnedge-serve-") as tmp:
        write_python_repository(
            Path(tmp) / "repo", name, path.read_bytes(), max_batch_size=max_batch,
            instances=instances, threads=threads, idle_us=int(idle_timeout * 1e6),
            rnnedge_path=str(server_env.rnnedge_source()))
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        running = None
        try:
            running = server.start(env, Path(tmp) / "repo", ports, host=host,
                                   log=log or Path(tmp) / "tritonserver.log")
            server.wait_ready(running, name)
            urls = running.urls
            click.echo(f"serving model {name!r} on Triton (Python backend, {instances} "
                       f"instance(s), batches of up to {max_batch} sequences)")
            click.echo(f"  HTTP    {urls['http']}\n  gRPC    {urls['grpc']}\n"
                       f"  metrics {urls['metrics']}\nCtrl-C to stop", nl=True)
            code = running.process.wait()
            raise server_env.ServerError(
                f"tritonserver exited on its own with code {code}; its log ends: "
                f"{running.log_tail().strip().splitlines()[-1:] or ['(empty)']}")
        except (KeyboardInterrupt, _Stop):
            click.echo("stopping the server", err=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if running is not None:
                server.stop(running)
