"""Hardening of the CLI, files and loaders (issue 12): nothing lost, nothing corrupt let through.

Each case runs ``rnnedge ...`` (click's runner, or a subprocess where a file-size limit
simulates a full disk) and asserts the exit code, the one ``error:`` line, and that every
file the command was given is byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rnnedge
from rnnedge.errors import UsageError

GRU_KW = {"input_size": 4, "hidden_size": 8, "batch_first": True}
ARCH = ["--arch", "torch.nn:GRU", "--arch-kwargs", json.dumps(GRU_KW), "--input-shape", "batch,time,4"]
EXTERNAL_ENV = "RNNEDGE_EXTERNAL_DATA_THRESHOLD"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A folder with model.pt (a GRU state_dict), ep.pt2 (its torch.export program) and
    graph.onnx (its exported graph), made once and copied into each test's folder."""
    folder = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    gru = nn.GRU(**GRU_KW)
    torch.save(gru.state_dict(), folder / "model.pt")
    torch.export.save(torch.export.export(gru, (torch.randn(2, 5, 4),)), folder / "ep.pt2")
    rnnedge.export(gru, folder / "graph.onnx", example_input=torch.randn(2, 5, 4))
    return folder


@pytest.fixture()
def w(made, tmp_path) -> Path:
    """This test's folder: model.pt, ep.pt2, graph.onnx (fresh copies)."""
    for name in ("model.pt", "ep.pt2", "graph.onnx"):
        shutil.copy(made / name, tmp_path / name)
    return tmp_path


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every regular file under ``folder`` (links not followed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def flip_bit_in_member(path: Path, suffix: str) -> str:
    """Flip one bit in the data of the zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix) and i.file_size > 8)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the member's stored bytes
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return info.filename


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# (id, argv with {w} for this test's folder, setup(w) before the run or None, exit code,
#  text the error line must hold). After each run every file that existed before is unchanged.
def _link(w: Path) -> None:
    (w / "link.pt").symlink_to(w / "model.pt")


def _hardlink(w: Path) -> None:
    os.link(w / "model.pt", w / "hard.pt")


def _fifo(w: Path) -> None:
    os.mkfifo(w / "pipe.onnx")


def _repo_with_model(w: Path) -> None:
    (w / "repo" / "m").mkdir(parents=True)
    shutil.copy(w / "model.pt", w / "repo" / "m" / "model.pt")


def _nan_weights(w: Path) -> None:
    state = torch.load(w / "model.pt")
    state["weight_hh_l0"][2, 3] = float("nan")
    torch.save(state, w / "model.pt")


def _inf_weights(w: Path) -> None:
    state = torch.load(w / "model.pt")
    state["bias_ih_l0"][0] = float("inf")
    state["bias_hh_l0"][1] = -float("inf")
    torch.save(state, w / "model.pt")


def _flip_pt(w: Path) -> None:
    flip_bit_in_member(w / "model.pt", "data/0")


def _flip_pt2(w: Path) -> None:
    flip_bit_in_member(w / "ep.pt2", "weights/weight_0")


CASES = [
    # --- data loss: an output that is an input, a link to one, a device, a fifo
    ("export -o MODEL", ["export", "{w}/model.pt", "-o", "{w}/model.pt", *ARCH], None, 2,
     "same file as MODEL"),
    ("export -o symlink to MODEL", ["export", "{w}/model.pt", "-o", "{w}/link.pt", *ARCH], _link, 2,
     "same file as MODEL"),
    ("export -o hard link to MODEL", ["export", "{w}/model.pt", "-o", "{w}/hard.pt", *ARCH], _hardlink,
     2, "same file as MODEL"),
    ("export -o the --arch file", ["export", "{w}/model.pt", "-o", "{w}/net.py", "--arch",
                                   "{w}/net.py:Net", "--input-shape", "batch,time,4"],
     lambda w: (w / "net.py").write_text("from torch.nn import GRU as Net\n"), 2, "same file as the --arch file"),
    ("export -o fifo", ["export", "{w}/model.pt", "-o", "{w}/pipe.onnx", *ARCH], _fifo, 2,
     "it is a fifo, not a regular file"),
    ("export -o /dev/null", ["export", "{w}/model.pt", "-o", "/dev/null", *ARCH], None, 2,
     "it is a character device"),
    ("export -o REPO/m.onnx --triton-repo REPO", ["export", "{w}/model.pt", "-o", "{w}/repo/m.onnx",
                                                  "--triton-repo", "{w}/repo", *ARCH],
     lambda w: (w / "repo").mkdir(), 2, "would land in or on the Triton repository"),
    ("Triton model folder holds MODEL", ["export", "{w}/repo/m/model.pt", "-o", "{w}/m.onnx",
                                         "--triton-repo", "{w}/repo", *ARCH],
     _repo_with_model, 2, "refusing to write the Triton model folder"),
    ("bench --json GRAPH", ["bench", "{w}/graph.onnx", "--json", "{w}/graph.onnx"], None, 2,
     "same file as GRAPH"),
    ("bench --plot GRAPH", ["bench", "{w}/graph.onnx", "--plot", "{w}/graph.onnx"], None, 2,
     "same file as GRAPH"),
    ("bench --json MODEL", ["bench", "{w}/graph.onnx", "--against", "{w}/model.pt", "--arch",
                            "torch.nn:GRU", "--arch-kwargs", json.dumps(GRU_KW), "--json", "{w}/model.pt"],
     None, 2, "same file as MODEL"),
    ("bench --json X --plot X", ["bench", "{w}/graph.onnx", "--json", "{w}/r.json", "--plot", "{w}/r.json"],
     None, 2, "same file as --json"),
    ("bench --plot into a missing folder", ["bench", "{w}/graph.onnx", "--plot", "{w}/no/such/p.png"],
     None, 2, "expected an existing folder"),
    ("demo --out ''", ["demo", "--out", ""], None, 2, "--out is empty"),
    # --- corruption
    ("bit-flipped .pt", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", *ARCH], _flip_pt, 2,
     "fails the zip check (CRC-32 mismatch)"),
    ("bit-flipped .pt2", ["export", "{w}/ep.pt2", "-o", "{w}/o.onnx", "--input-shape", "batch,time,4"],
     _flip_pt2, 2, "fails the zip check (CRC-32 mismatch)"),
    ("NaN weights", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", *ARCH], _nan_weights, 2,
     "weights hold NaN values: weight_hh_l0 (1 NaN)"),
    ("inf weights", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", *ARCH], _inf_weights, 2,
     "weights hold inf values: bias_ih_l0 (1 inf); bias_hh_l0 (1 inf)"),
    *[(f"verify --{tol} {value}", ["verify", "{w}/graph.onnx", "--against", "{w}/model.pt",
                                   "--arch", "torch.nn:GRU", "--arch-kwargs", json.dumps(GRU_KW),
                                   f"--{tol}", value], None, 2, f"--{tol} must be a finite number >= 0")
      for tol in ("atol", "rtol") for value in ("inf", "-1e-3", "nan")],
    ("export --atol inf", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", *ARCH, "--atol", "inf"], None, 2,
     "--atol must be a finite number >= 0"),
    # --- resource bounds
    ("demo --budget inf", ["demo", "--out", "{w}/d", "--budget", "inf"], None, 2,
     "--budget must be a number of seconds > 0 and <= 86400"),
    ("demo --budget nan", ["demo", "--out", "{w}/d", "--budget", "nan"], None, 2, "--budget must be"),
    ("demo --hidden 100000", ["demo", "--out", "{w}/d", "--hidden", "100000"], None, 2,
     "--hidden must be an integer from 1 to 16,384"),
    ("--input-shape batch,time,10^11", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", "--arch", "torch.nn:GRU",
                                        "--arch-kwargs", json.dumps(GRU_KW), "--input-shape",
                                        "batch,time,100000000000"], None, 2, "over rnnedge's limit of 268,435,456"),
    ("bench --batch 10^12", ["bench", "{w}/graph.onnx", "--batch", "1000000000000"], None, 2,
     "over rnnedge's limit"),
    ("bench --steps 10^12", ["bench", "{w}/graph.onnx", "--steps", "1000000000000"], None, 2,
     "steps must be an integer from 1 to 10,000,000"),
    # --- unclear errors made clear
    ("--arch-kwargs hidden_size 0", ["export", "{w}/model.pt", "-o", "{w}/o.onnx", "--arch", "torch.nn:GRU",
                                     "--arch-kwargs", '{"input_size": 4, "hidden_size": 0}',
                                     "--input-shape", "batch,time,4"], None, 2,
     "--arch torch.nn:GRU: GRU(**{'input_size': 4, 'hidden_size': 0}) failed (ValueError"),
]


@pytest.mark.parametrize("argv,setup,code,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_lost(cli, w, argv, setup, code, text):
    if setup:
        setup(w)
    before = snapshot(w)
    line = cli.one_error_line(cli(*[a.replace("{w}", str(w)) for a in argv]), code)
    assert text in line, line
    assert "RuntimeWarning" not in line and "report it" not in line
    after = snapshot(w)
    assert {k: after.get(k) for k in before} == before  # every input byte-for-byte unchanged
    assert not [k for k in after if k not in before]  # and nothing new (no temp files)
    assert Path("/dev/null").is_char_device()


def test_tolerances_are_checked_by_the_api_too(made, tmp_path):
    gru = nn.GRU(**GRU_KW)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(UsageError, match="atol must be a finite number >= 0"):
            rnnedge.export(gru, tmp_path / "o.onnx", example_input=torch.randn(2, 5, 4), atol=bad)
        with pytest.raises(UsageError, match="rtol must be a finite number >= 0"):
            rnnedge.export(gru, tmp_path / "o.onnx", example_input=torch.randn(2, 5, 4), rtol=bad)
    assert os.listdir(tmp_path) == []


def test_model_over_2_gib_is_refused_before_tracing(tmp_path):
    # Meta tensors: 8.6 GB of LSTM weights described, none allocated. A whole model (a bare
    # layer that big is written with external data: tests/test_large_graphs.py).
    big = nn.Sequential(nn.LSTM(16384, 16384, device="meta"))
    with pytest.raises(UsageError, match=r"weights take 8\.0 GiB"):
        rnnedge.export(big, tmp_path / "big.onnx", example_input=torch.zeros(1, 2, 16384, device="meta"))
    assert os.listdir(tmp_path) == []


def test_large_graph_is_written_with_external_data(cli, tmp_path, monkeypatch):
    torch.manual_seed(0)
    gru = nn.GRU(4, 32, batch_first=True)  # its recurrent weights are 12 KiB, the graph more
    out = tmp_path / "g.onnx"
    monkeypatch.setenv(EXTERNAL_ENV, "4096")
    report = rnnedge.export(gru, out, example_input=torch.randn(2, 5, 4))
    data = tmp_path / "g.onnx.data"
    assert sorted(os.listdir(tmp_path)) == ["g.onnx", "g.onnx.data"]
    assert data.stat().st_size > out.stat().st_size  # the weights went out
    assert report.graph["bytes"] == data.stat().st_size + out.stat().st_size
    x = np.random.default_rng(0).standard_normal((1, 7, 4)).astype(np.float32)
    got = rnnedge.load(out, device="cpu").stream(batch=1).step(x)
    with torch.no_grad():
        want = gru(torch.from_numpy(x))[0].numpy()
    assert np.abs(got - want).max() < 1e-5
    # verify and bench read the data file beside the graph too.
    torch.save(gru.state_dict(), tmp_path / "m.pt")
    kwargs = json.dumps({"input_size": 4, "hidden_size": 32, "batch_first": True})
    again = cli("verify", out, "--against", tmp_path / "m.pt", "--arch", "torch.nn:GRU", "--arch-kwargs", kwargs)
    assert again.exit_code == 0 and "verified: g.onnx equals" in again.stdout, again.output

    monkeypatch.setenv(EXTERNAL_ENV, "0")
    with pytest.raises(UsageError, match=EXTERNAL_ENV):
        rnnedge.export(gru, out, example_input=torch.randn(2, 5, 4))


def test_external_data_file_that_is_an_input_is_refused(w, cli, monkeypatch):
    monkeypatch.setenv(EXTERNAL_ENV, "1000")
    shutil.copy(w / "model.pt", w / "o.onnx.data")
    before = snapshot(w)
    # The graph itself is a new file; its data file would replace MODEL (same name here).
    line = cli.one_error_line(cli("export", w / "o.onnx.data", "-o", w / "o.onnx", *ARCH), 2)
    assert "refusing to write the external data file" in line and "same file as MODEL" in line
    assert snapshot(w) == before


def test_stale_temp_files_of_dead_writers_are_removed(w, cli):
    stale = w / f".o.onnx.rnnedge-tmp-{dead_pid()}-0badc0de"
    stale.write_bytes(b"half a graph")
    alive = w / f".o.onnx.rnnedge-tmp-{os.getpid()}-0badc0de"  # a live writer's: kept
    alive.write_bytes(b"being written")
    other = w / f".other.onnx.rnnedge-tmp-{dead_pid()}-0badc0de"  # another destination's: kept
    other.write_bytes(b"not ours")
    stale_folder = w / "repo" / f".o.rnnedge-tmp-{dead_pid()}-0badc0de"  # a Triton model's
    (stale_folder / "1").mkdir(parents=True)
    result = cli("export", w / "model.pt", "-o", w / "o.onnx", "--triton-repo", w / "repo", *ARCH)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and alive.exists() and other.exists()
    assert sorted(os.listdir(w / "repo")) == ["o"]
    assert not [p for p in os.listdir(w) if ".rnnedge-tmp-" in p and p not in (alive.name, other.name)]


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from rnnedge.cli import main
main(sys.argv[1:], prog_name="rnnedge")
"""


def run_on_full_disk(args: list, limit: int) -> subprocess.CompletedProcess:
    """``rnnedge ARGS`` in a subprocess whose files cannot grow past ``limit`` bytes."""
    return subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=limit), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def full_disk_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: writing "), proc.stderr
    assert "File too large" in lines[0] and "nothing was written" in lines[0]
    return lines[0]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
@pytest.mark.slow
def test_demo_on_a_full_disk_leaves_no_empty_model(tmp_path):
    out = tmp_path / "d"
    proc = run_on_full_disk(["demo", "--out", out, "--budget", "0.05", "--quick", "--hidden", "8"], 2000)
    assert "model.pt" in full_disk_line(proc)
    assert os.listdir(out) == []  # no 0-byte model.pt, no temporary file


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
@pytest.mark.slow
def test_triton_repository_on_a_full_disk(w):
    before = snapshot(w)
    proc = run_on_full_disk(["export", w / "model.pt", "-o", w / "m.onnx", "--triton-repo", w / "repo",
                             *ARCH], 2000)
    assert "repo" in full_disk_line(proc)
    assert snapshot(w) == before and sorted(os.listdir(w)) == sorted(before)  # no repo, no graph


@pytest.mark.slow
def test_demo_summary_wraps_instead_of_cropping(cli, tmp_path):
    result = cli("demo", "--out", tmp_path / "d", "--quick", "--budget", "0.3")
    assert result.exit_code == 0, result.output
    # Not a terminal: every sentence is there in full, wrapped over lines, none cut short.
    words = " ".join(result.stdout.split())
    assert "forecast by streaming the ONNX graph a day per call" in words
    assert "state carried between calls" in words
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()
               if not line.startswith(("files:", "  rnnedge "))) <= 110
