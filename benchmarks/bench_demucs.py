"""Per-chunk latency of `denoiser`'s causal Demucs streamed: rnnedge vs the package's own
hand-written ``DemucsStreamer`` (issue 14), on the same model, the same chunks, one thread.

Model: ``denoiser.demucs.Demucs(hidden=48, depth=5, kernel_size=8, stride=4, causal=True,
normalize=False, resample=R)`` for R in (1, 2), random weights (seed 0); input a 4 s
signal at 16 kHz, (1, 1, 64000). ``normalize=False`` because the model's own normalization
divides by the whole input's std, which no streamer can know in advance. Per resample:

- ``DemucsStreamer(model, num_frames=1).feed(chunk)``, as the package's own ``test()``
  drives it: a first call of ``streamer.total_length`` samples, then chunks of
  ``model.total_stride`` samples (one frame each), then ``flush()``; with torch's defaults
  and again with ``torch.backends.mkldnn`` off (torch's mkldnn LSTM on one time step per
  call is slower than the native kernel here, and flips between two speeds from pass to
  pass: the faster of the two rows is the package at its best);
- rnnedge: the model exported once in stream mode, ``rnnedge.load(path, device="cpu",
  threads=1).stream(batch=1)``, ``stream.step`` on the same chunks, shaped (1, 1, chunk),
  then ``stream.flush()``.

The engines are fed chunk by chunk in turn (so load on the machine hits both alike); times
are single ``feed``/``step`` calls on a full chunk after the first call, median and p90 in
ms over ``--passes`` passes of the signal (a fresh streamer/stream each pass). Real-time
factor: median time per chunk / the chunk's duration at 16 kHz (< 1: faster than real
time). Correctness: each side's whole stream (steps and flush joined) against ``model(x)``
on the whole signal: max abs difference and relative L2 (||streamed - whole|| / ||whole||,
the "delta batch/streaming" that DemucsStreamer's test() prints), and max abs without the
last ``streamer.total_length`` samples (the whole-signal model's tail depends on how far
it pads the end, ``valid_length``; a streamer's flush pads its own way). "first output":
ms of input fed before a call first returned samples.

Where ``rnnedge.export`` refuses the model (UnsupportedModelError) its row says so and
the benchmark carries on; without the ``denoiser`` package it exits 0 with one line.

    python benchmarks/bench_demucs.py [--quick] [--write] [--hidden 48 --depth 5 ...]

--quick: a small model (hidden 8, depth 3) on 1 s, one pass: a smoke run of seconds.
--write: replace this benchmark's section in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rnnedge
from rnnedge.errors import RnnedgeError, UnsupportedModelError

RATE = 16000
BEGIN, END = "<!-- bench_demucs: begin -->", "<!-- bench_demucs: end -->"
FULL = {"hidden": 48, "depth": 5, "kernel_size": 8, "stride": 4, "seconds": 4.0, "passes": 3}
QUICK = {"hidden": 8, "depth": 3, "kernel_size": 8, "stride": 4, "seconds": 1.0, "passes": 1}


def _chunks(x: np.ndarray, first: int, chunk: int) -> list[np.ndarray]:
    """x (1, 1, T) cut as DemucsStreamer's test() feeds it: ``first`` samples, then ``chunk``s."""
    cuts = [0, *range(first, x.shape[-1], chunk), x.shape[-1]]
    return [x[..., a:b] for a, b in zip(cuts, cuts[1:])]


class Side:
    """One engine's pass over the chunks: its outputs, the timed calls and the first output."""

    def __init__(self, call, flush):
        self.call, self.flush = call, flush
        self.outs: list[np.ndarray] = []
        self.times: list[float] = []
        self.fed = 0
        self.first_output = None  # samples fed before a call first returned output

    def feed(self, piece: np.ndarray, timed: bool) -> None:
        t = time.perf_counter()
        out = self.call(piece)
        dt = time.perf_counter() - t
        if timed:
            self.times.append(dt)
        self.fed += piece.shape[-1]
        if self.first_output is None and out.shape[-1]:
            self.first_output = self.fed
        self.outs.append(out)

    def finish(self) -> None:
        """End of stream (untimed): the flush's output joins the others."""
        self.outs.append(self.flush())

    def whole(self) -> np.ndarray:
        """(T,) every call's output and the flush, joined."""
        return np.concatenate([o.reshape(-1) for o in self.outs])


def _streamer_side(model, streamer_cls, mkldnn: bool) -> tuple[Side, int]:
    streamer = streamer_cls(model, num_frames=1)
    backend = torch.backends.mkldnn

    def with_mkldnn(fn):  # the switch itself: mkldnn.flags() also sets TF32 and warns
        def call(*args):
            was, backend.enabled = backend.enabled, mkldnn
            try:
                return fn(*args).numpy()
            finally:
                backend.enabled = was
        return call

    # (1, 1, n) -> (n',): the streamer takes and gives (channels, time)
    feed = with_mkldnn(lambda piece: streamer.feed(torch.from_numpy(piece[0])))
    return Side(feed, with_mkldnn(streamer.flush)), streamer.total_length


def _rnnedge_side(loaded) -> Side:
    stream = loaded.stream(batch=1)
    return Side(stream.step, stream.flush)


def _export(model, example_len: int, tmp: Path):
    """The loaded rnnedge model, or the one-line reason it is not there."""
    path = tmp / f"demucs-r{model.resample}.onnx"
    try:
        rnnedge.export(model, path, example_input=torch.randn(1, 1, example_len),
                       input_axes=("batch", 1, "time"))
    except UnsupportedModelError as exc:
        return f"refused: {str(exc)[:100]}"
    except RnnedgeError as exc:  # e.g. the gate's ParityError: say which, carry on
        return f"failed ({type(exc).__name__}): {str(exc)[:100]}"
    return rnnedge.load(path, device="cpu", threads=1)


def _diff(got: np.ndarray, want: np.ndarray, tail: int) -> str:
    """max abs | max abs before the last ``tail`` samples | relative L2, as table cells."""
    if got.shape != want.shape:
        return f"length {got.shape[0]} (whole: {want.shape[0]}) | n/a | n/a"
    err = np.abs(got - want)
    return (f"{err.max():.2g} | {err[:-tail].max():.2g} | "
            f"{np.linalg.norm(err) / np.linalg.norm(want):.2e}")


def _row(name: str, r: int, chunk: int, side: Side, want: np.ndarray, tail: int) -> str:
    ms = np.array(side.times) * 1e3
    med, p90 = np.median(ms), np.percentile(ms, 90)
    lag = "n/a" if side.first_output is None else f"{side.first_output / RATE * 1e3:.0f}"
    return (f"| {r} | {name} | {chunk} ({chunk / RATE * 1e3:g} ms) | {med:.2f} | {p90:.2f} | "
            f"{med / (chunk / RATE * 1e3):.3f} | {lag} | {_diff(side.whole(), want, tail)} |")


def bench(cfg: dict, resample: int, tmp: Path) -> list[str]:
    """The table rows (DemucsStreamer with and without mkldnn, rnnedge) for one resample."""
    from denoiser.demucs import Demucs, DemucsStreamer

    torch.manual_seed(0)
    model = Demucs(hidden=cfg["hidden"], depth=cfg["depth"], kernel_size=cfg["kernel_size"],
                   stride=cfg["stride"], causal=True, normalize=False, resample=resample).eval()
    chunk = model.total_stride
    x = np.random.default_rng(0).standard_normal((1, 1, int(cfg["seconds"] * RATE)), np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy().reshape(-1)
        loaded = _export(model, model.valid_length(4 * chunk), tmp)
        passes: list[list[Side]] = []
        for _ in range(cfg["passes"]):
            side, first = _streamer_side(model, DemucsStreamer, True)
            sides = [side, _streamer_side(model, DemucsStreamer, False)[0]]
            if not isinstance(loaded, str):
                sides.append(_rnnedge_side(loaded))
            pieces = _chunks(x, first, chunk)
            for i, piece in enumerate(pieces):
                for s in sides:  # in turn: a load spike on the machine hits both
                    s.feed(piece, timed=i > 0 and piece.shape[-1] == chunk)
            for s in sides:
                s.finish()
            passes.append(sides)
    names = ["DemucsStreamer", "DemucsStreamer, mkldnn off", "rnnedge"]
    rows = [_row(name, resample, chunk, _merged([p[i] for p in passes]), want, first)
            for i, name in enumerate(names[:len(passes[0])])]
    if isinstance(loaded, str):
        rows.append(f"| {resample} | rnnedge | {chunk} ({chunk / RATE * 1e3:g} ms) | {loaded} "
                    "| | | | | | |")
    return rows


def _merged(sides: list[Side]) -> Side:
    """The first pass (outputs, first output) with every pass's times."""
    first = sides[0]
    first.times = [t for s in sides for t in s.times]
    return first


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, 1 s, one pass")
    p.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--resample", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4])
    args = p.parse_args(argv)
    try:
        import denoiser.demucs  # noqa: F401
    except ImportError as exc:
        print(f"bench_demucs: skipped, the denoiser package is not importable ({exc}); "
              "pip install --no-deps denoiser")
        return 0
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v)
           for k, v in (QUICK if args.quick else FULL).items()}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for r in args.resample for row in bench(cfg, r, Path(tmp))]
    text = _section(cfg, argv, rows)
    print(text)
    if args.write:
        results = Path(__file__).with_name("RESULTS.md")
        old = results.read_text()
        if BEGIN in old:
            old = old[: old.index(BEGIN)] + old[old.index(END) + len(END):].lstrip("\n")
        results.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
    return 0


def _section(cfg: dict, argv: list[str], rows: list[str]) -> str:
    import onnxruntime

    from rnnedge.bench import machine_info

    m = machine_info(1, "cpu")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()[:2])
    cmd = " ".join(["python benchmarks/bench_demucs.py", *argv])
    return "\n".join([
        BEGIN,
        "## Demucs (denoiser) streamed: rnnedge vs DemucsStreamer",
        "",
        f"Generated by `{cmd}`. Model: `denoiser.demucs.Demucs(hidden={cfg['hidden']}, "
        f"depth={cfg['depth']}, kernel_size={cfg['kernel_size']}, stride={cfg['stride']}, "
        "causal=True, normalize=False, resample=R)`, random weights (seed 0); a "
        f"{cfg['seconds']:g} s signal at 16 kHz cut as the package's own test() feeds it (a "
        "first call of `streamer.total_length` samples, then chunks of `model.total_stride`); "
        "the engines fed in turn, chunk by chunk; batch 1, one thread (torch and "
        f"onnxruntime); ms per full chunk after the first call, over {cfg['passes']} "
        "pass(es). mkldnn off: `torch.backends.mkldnn` disabled around each call (torch's "
        "mkldnn LSTM is slow and erratic on one time step per call). RTF: median / the "
        "chunk's duration. First output: ms of input fed before a "
        "call first returned samples. Max abs and relative L2: the whole stream (flush "
        "included) against `model(x)` on the whole signal; tail excluded: all but the last "
        "`streamer.total_length` samples, whose whole-signal values depend on how far the "
        "model pads the end (`valid_length`) while a streamer's flush pads its own way.",
        "",
        "| resample | engine | chunk (samples) | median ms | p90 ms | RTF | first output (ms) "
        "| max abs vs whole | max abs, tail excluded | rel. L2 vs whole |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores available, {m['platform']}; load average "
        f"(1, 5 min) at the end: {load} (other processes on the machine disturb the figures). "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.",
        END,
    ])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
