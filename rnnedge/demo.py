"""``rnnedge demo``: the whole story on a built-in example, offline, in well under a minute.

A synthetic sensor (hourly temperature: a daily and a weekly season, a slow drift and
noise) is normalised and split in time into train and test; a small LSTM (or GRU)
forecaster learns to predict the next reading for a fixed training budget; it is saved,
exported to a stateful ONNX graph, proven equal by the parity gate, used to forecast the
test period through the rnnedge runtime (stream, chunk by chunk, state carried), and
measured against eager PyTorch.

The model class lives here (``rnnedge.demo:Forecaster``) so that ``rnnedge verify/bench
--against DIR/model.pt --arch rnnedge.demo:Forecaster`` can rebuild it from the saved
state_dict without unpickling code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnedge.errors import UnsupportedModelError, UsageError
from rnnedge.limits import MAX_HIDDEN, check_count, check_seconds

HOURS_PER_DAY = 24
SERIES_LENGTH = 24 * 7 * 36  # 36 weeks of hourly readings
TRAIN_FRACTION = 0.8
WINDOW = 96  # training sequence length: four days of context
WARMUP = 8  # the first predictions of a window see little history: not scored in training
EVAL_CHUNK = 24  # the runtime is fed a day at a time when forecasting the test period
CELLS = ("lstm", "gru")
#: What the demo writes into its folder (core.pt only when the head runs in numpy).
OUTPUT_FILES = ("model.pt", "core.pt", "forecaster.onnx", "bench.json", "report.json")


class Forecaster(nn.Module):
    """Next-value forecaster: a recurrent layer and a linear head.

    x: (batch, time, 1) normalised readings; returns (batch, time, 1), where [:, t] is the
    prediction of the reading at t + 1. The recurrent state starts at zero each call in
    eager PyTorch; the exported graph takes and returns it (state lifting), so a stream
    carries it across calls.
    """

    def __init__(self, hidden_size: int = 32, cell: str = "lstm"):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        layer = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = layer(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


@dataclass
class Series:
    """The sensor series (°C, (n,)), its normalisation and the train/test split index."""

    values: np.ndarray
    mean: float
    std: float
    split: int

    @property
    def normalized(self) -> np.ndarray:
        return ((self.values - self.mean) / self.std).astype(np.float32)


def make_series(length: int = SERIES_LENGTH, seed: int = 0) -> Series:
    """A synthetic hourly temperature sensor: daily and weekly seasons, drift, noise.

    Normalised with the training part's mean and std only (the test part is unseen).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    daily = 4.0 * np.sin(2 * np.pi * t / HOURS_PER_DAY - 2.0)
    weekly = 1.5 * np.sin(2 * np.pi * t / (HOURS_PER_DAY * 7) + 0.5)
    # A slow, mean-reverting drift (weather), then sensor noise on every reading.
    drift = np.zeros(length)
    shocks = rng.normal(0.0, 0.15, length)
    for i in range(1, length):
        drift[i] = 0.995 * drift[i - 1] + shocks[i]
    values = 18.0 + daily + weekly + drift + rng.normal(0.0, 0.3, length)
    split = int(length * TRAIN_FRACTION)
    train = values[:split]
    return Series(values.astype(np.float32), float(train.mean()), float(train.std()), split)


@dataclass
class Training:
    steps: int
    seconds: float
    final_loss: float


def train(model: Forecaster, series: Series, budget: float, seed: int = 0,
          batch: int = 32) -> Training:
    """Adam on random train windows of WINDOW steps until ``budget`` seconds have passed.

    Loss: MSE of next-step predictions (normalised units), the first WARMUP skipped.
    Runs on one thread: the model is small enough that a second thread barely helps, and
    on a busy machine torch's spinning worker threads can make steps many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, series, budget, seed, batch)
    finally:
        torch.set_num_threads(threads)


def _train(model: Forecaster, series: Series, budget: float, seed: int, batch: int) -> Training:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(series.normalized[: series.split])
    starts_max = len(data) - WINDOW - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    start = time.perf_counter()
    steps, loss_value = 0, float("nan")
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget and steps > 0:
            break
        if steps and steps % 150 == 0:  # a simple decay: big steps first, then settle
            for group in opt.param_groups:
                group["lr"] = max(group["lr"] * 0.6, 1e-3)
        idx = rng.integers(0, starts_max, size=batch)
        windows = torch.stack([data[i: i + WINDOW + 1] for i in idx]).unsqueeze(-1)
        x, y = windows[:, :-1], windows[:, 1:]
        pred = model(x)
        loss = nn.functional.mse_loss(pred[:, WARMUP:], y[:, WARMUP:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        loss_value = float(loss.detach())
    model.eval()
    return Training(steps, time.perf_counter() - start, loss_value)


@dataclass
class Exported:
    """What was exported: the graph, the model file verify/bench load, and how."""

    graph: Path
    against: Path
    arch: str
    arch_kwargs: dict
    full_model: bool  # False: only the recurrent core (head applied in numpy), see export_forecaster
    module: nn.Module
    parity: dict
    note: str = ""


def export_forecaster(model: Forecaster, out: Path, hidden: int, cell: str) -> Exported:
    """Export the whole forecaster; when this rnnedge cannot export models built around
    recurrent layers, export its recurrent core alone (the head then runs in numpy)."""
    import rnnedge

    example = torch.zeros(2, 5, 1)
    graph = out / "forecaster.onnx"
    try:
        report = rnnedge.export(model, graph, example_input=example, input_axes=[("batch", "time", 1)])
        return Exported(graph, out / "model.pt", "rnnedge.demo:Forecaster",
                        {"hidden_size": hidden, "cell": cell}, True, model, report.metadata["parity"])
    except (ImportError, UnsupportedModelError) as exc:
        note = (f"the whole forecaster could not be exported here ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120]}); exported its {cell.upper()} core, head in numpy")
    core = model.rnn
    core_path = out / "core.pt"
    save_state(core, core_path)
    report = rnnedge.export(core, graph, example_input=example, input_axes=[("batch", "time", 1)])
    kwargs = {"input_size": 1, "hidden_size": hidden, "batch_first": True}
    return Exported(graph, core_path, f"torch.nn:{cell.upper()}", kwargs, False, core,
                    report.metadata["parity"], note)


def forecast_with_graph(exported: Exported, model: Forecaster, x: np.ndarray) -> np.ndarray:
    """Stream the normalised series ``x`` (n,) through the graph, EVAL_CHUNK steps a call.

    Returns the next-step predictions (n,), as eager ``model`` would give over the whole
    series at once.
    """
    from rnnedge.runtime import load

    stream = load(exported.graph, device="cpu").stream(batch=1)
    y = stream.run(x.reshape(1, -1, 1), chunk=EVAL_CHUNK)
    if not exported.full_model:  # core only: apply the linear head here
        w = model.head.weight.detach().numpy()
        b = model.head.bias.detach().numpy()
        y = y @ w.T + b
    return y.reshape(-1)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@dataclass
class DemoResult:
    out: Path
    series: Series
    training: Training
    exported: Exported
    test_rmse: float
    naive_rmse: float
    stream_max_abs: float
    verify: object  # rnnedge.exporters.verify.VerifyReport
    bench: object  # rnnedge.bench.BenchReport
    seconds: float
    files: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per phase

    def commands(self) -> dict:
        e = self.exported
        model = (f"--against {e.against} --arch {e.arch} --arch-kwargs '{json.dumps(e.arch_kwargs)}'")
        return {"verify": f"rnnedge verify {e.graph} {model}",
                "bench": f"rnnedge bench {e.graph} {model} --chunk 1,8,64"}

    def as_dict(self) -> dict:
        v = self.verify.as_dict()
        return {
            "seconds": self.seconds,
            "timings": dict(self.timings),
            "data": {"length": int(len(self.series.values)), "train": self.series.split,
                     "test": int(len(self.series.values) - self.series.split)},
            "training": {"steps": self.training.steps, "seconds": self.training.seconds,
                         "final_loss": self.training.final_loss},
            "forecast": {"test_rmse": self.test_rmse, "naive_rmse": self.naive_rmse,
                         "units": "degC", "stream_vs_eager_max_abs": self.stream_max_abs},
            "export": {"graph": str(self.exported.graph), "full_model": self.exported.full_model,
                       "parity": self.exported.parity, "note": self.exported.note},
            "verify": {k: v[k] for k in ("passed", "max_abs", "max_rel", "atol", "rtol", "device")}
                      | {"cases": len(v["cases"])},
            "bench": self.bench.as_dict(),
            "files": {k: str(p) for k, p in self.files.items()},
            "commands": self.commands(),
        }


def run_demo(out, *, budget: float = 10.0, quick: bool = False, hidden: int = 32, cell: str = "lstm",
             seed: int = 0, status: Callable[[str], None] | None = None) -> DemoResult:
    """Train, save, export, verify, forecast and benchmark; write everything under ``out``.

    budget: seconds of training. quick: a shorter benchmark (for tests and smoke runs).
    """
    from rnnedge.bench import benchmark, write_json
    from rnnedge.exporters.verify import raise_on_failure, verify
    from rnnedge.files import check_destination, write_bytes_atomic

    status = status or (lambda text: None)
    budget, hidden, out = check_demo_args(out, budget, hidden, cell)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {out} ({exc.strerror}); choose another --out") from None
    for name in OUTPUT_FILES:  # a folder or a device named like an output: refused before training
        check_destination(out / name)

    status("making the sensor series")
    series = make_series(seed=seed)
    torch.manual_seed(seed)
    model = Forecaster(hidden, cell)
    status(f"training a {cell.upper()}({hidden}) forecaster for {budget:g} s")
    training = train(model, series, budget, seed)
    model_path = out / "model.pt"
    save_state(model, model_path)
    lap("train")

    status("exporting")
    exported = export_forecaster(model, out, hidden, cell)
    lap("export")

    status("verifying the written graph")
    report = verify(exported.graph, exported.module, source=str(exported.against),
                    progress=lambda case: status(f"verifying: {case}"))
    raise_on_failure(report)
    lap("verify")

    status("forecasting the test period through the rnnedge runtime")
    x = series.normalized
    preds = forecast_with_graph(exported, model, x)
    with torch.inference_mode():
        eager = model(torch.from_numpy(x).reshape(1, -1, 1)).numpy().reshape(-1)
    stream_max_abs = float(np.max(np.abs(preds - eager)))
    test = slice(series.split - 1, len(x) - 1)  # predictions made at t for t + 1 in the test part
    target = series.values[series.split:]
    test_rmse = rmse(preds[test] * series.std + series.mean, target)
    naive_rmse = rmse(series.values[test], target)
    lap("forecast")

    status("benchmarking")
    bench = benchmark(exported.graph, module=exported.module, plan=report.plan, batches=(1,),
                      chunks=(1, 32), steps=300 if quick else 2000, max_seconds=0.25 if quick else 1.0,
                      progress=lambda done, total, label: status(f"benchmarking: {label}"))
    lap("bench")
    files = {"model": model_path, "graph": exported.graph}
    if not exported.full_model:
        files["core"] = exported.against
    files["bench"] = write_json(bench, out / "bench.json")
    files["report"] = out / "report.json"
    result = DemoResult(out, series, training, exported, test_rmse, naive_rmse, stream_max_abs,
                        report, bench, time.perf_counter() - start, files, timings)
    write_bytes_atomic(files["report"], (json.dumps(result.as_dict(), indent=2) + "\n").encode())
    return result


def check_demo_args(out, budget, hidden, cell) -> tuple[float, int, Path]:
    """(budget, hidden, out folder) checked before any work: UsageError for what no run can do
    (an endless budget, a hidden size of terabytes, an empty or file-valued --out)."""
    budget = check_seconds("--budget", budget)
    hidden = check_count("--hidden", hidden, MAX_HIDDEN)
    if cell not in CELLS:
        raise UsageError(f"--cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if out is None or str(out).strip() == "":
        raise UsageError("--out is empty: give the folder for the demo's files, e.g. --out rnnedge-demo")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give a folder (it may not exist yet)")
    return budget, hidden, out


def save_state(module: nn.Module, path: Path) -> Path:
    """torch.save of ``module``'s state_dict, atomically: a full disk leaves no empty or
    partial file (torch.save onto a path reports a failed write as a bare RuntimeError, so
    it writes to a Python file, whose OSError becomes a one-line error)."""
    from rnnedge.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(module.state_dict(), f)
    return path


def print_report(result: DemoResult, console=None) -> None:
    """The short story: data, training, forecast quality, parity, latency, files."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=110)
    r, s, e, v, b = result, result.series, result.exported, result.verify, result.bench
    console.print(f"[bold]rnnedge demo[/bold]: a recurrent forecaster trained in PyTorch, exported, "
                  f"proven equal and measured, in {r.seconds:.1f} s")
    story = Table.grid(padding=(0, 2))
    story.add_column(style="bold", no_wrap=True)
    story.add_column(overflow="fold")  # wrapped, and a long path folded: never cropped
    story.add_row("data", f"{len(s.values):,} hourly readings of a synthetic temperature sensor (daily and "
                          f"weekly seasons, drift, noise); train {s.split:,}, test {len(s.values) - s.split:,}")
    params = sum(p.numel() for p in e.module.parameters())
    layer = type(e.module.rnn if e.full_model else e.module).__name__
    story.add_row("training", f"{layer}({e.arch_kwargs.get('hidden_size')}) + Linear forecaster, "
                              f"{params:,} parameters: {r.training.steps:,} Adam steps in "
                              f"{r.training.seconds:.1f} s, final loss {r.training.final_loss:.4f}")
    better = r.naive_rmse / r.test_rmse if r.test_rmse > 0 else float("inf")
    story.add_row("forecast", f"test RMSE {r.test_rmse:.3f} °C vs naive last-value {r.naive_rmse:.3f} °C "
                              f"({better:.1f}× lower), forecast by streaming the ONNX graph a day per call")
    what = "the whole forecaster" if e.full_model else f"the {layer} core ({e.note})"
    story.add_row("exported", f"{e.graph.name}: {what}, state carried between calls")
    story.add_row("parity", f"{len(v.cases)} gate cases passed on the written file: max abs {v.max_abs:.2g}, "
                            f"max rel {v.max_rel:.2g} (atol {v.atol:g}, rtol {v.rtol:g}); the whole series "
                            f"streamed vs eager in one call: max abs {r.stream_max_abs:.2g}")
    chunks = b.settings["chunks"]
    lines = []
    for c in chunks:
        mine = b.row("rnnedge", 1, c).p50_us_per_step
        eagers = [b.row(n, 1, c) for n in ("eager", "eager-no-mkldnn") if b.row(n, 1, c)]
        if eagers:
            best = min(eagers, key=lambda row: row.p50_us_per_step)
            lines.append(f"chunk {c}: {best.p50_us_per_step / mine:.1f}× faster than eager ({best.engine})")
    story.add_row("latency", "; ".join(lines) or "see the table")
    console.print(story)

    table = Table(title=f"latency per step, p50 µs (batch 1, {b.settings['threads']} thread)")
    table.add_column("engine")
    for c in chunks:
        table.add_column(f"chunk {c}", justify="right")
    for n in ("rnnedge", "onnxruntime", "eager", "eager-no-mkldnn"):
        if b.row(n, 1, chunks[0]):
            table.add_row(n, *[f"{b.row(n, 1, c).p50_us_per_step:,.1f}" for c in chunks])
    table.add_row("weight-bandwidth floor", *[f"{b.floor.us_per_step:,.2f}" for _ in chunks])
    console.print(table)
    console.print("files: " + ", ".join(f"{k} {p}" for k, p in r.files.items()), soft_wrap=True)
    console.print("again:", soft_wrap=True)
    for cmd in r.commands().values():
        console.print(f"  {cmd}", soft_wrap=True, highlight=False)
