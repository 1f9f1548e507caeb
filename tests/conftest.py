"""Shared fixtures: the ``rnnedge`` command run in-process, seeded tiny models, their files.

torch is imported inside the model fixtures, not here: the runtime's tests run without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

# The tiny models' shapes: (batch, time, input_size) inputs, batch first.
TINY_LSTM = {"input_size": 6, "hidden_size": 10, "num_layers": 2, "batch_first": True}
TINY_GRU = {"input_size": 4, "hidden_size": 8, "num_layers": 1, "batch_first": True}


class Cli:
    """Runs ``rnnedge ARGS...`` through click's CliRunner; the result has ``exit_code``,
    ``stdout``, ``stderr`` and ``output`` (both, interleaved)."""

    def __call__(self, *args) -> Result:
        from rnnedge.cli import main

        # catch_exceptions=False: a crash outside the CLI's own error mapping fails the test
        # with its traceback instead of hiding in result.exception.
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    @staticmethod
    def one_error_line(result: Result, code: int) -> str:
        """The single ``error: ...`` line a failed command prints, after checking its exit code."""
        assert result.exit_code == code, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.output
        return lines[0]


@pytest.fixture()
def cli() -> Cli:
    """``cli("export", path, "-o", out)``: the command's result; ``cli.one_error_line(result, 2)``."""
    return Cli()


@pytest.fixture()
def tiny_lstm():
    """A 2-layer LSTM, 6 -> 10, batch first, seed 0: input (batch, time, 6), output (batch, time, 10)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.LSTM(**TINY_LSTM)


@pytest.fixture()
def tiny_gru():
    """A 1-layer GRU, 4 -> 8, batch first, seed 0: input (batch, time, 4), output (batch, time, 8)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.GRU(**TINY_GRU)


@pytest.fixture()
def tiny_lstm_file(tmp_path: Path, tiny_lstm) -> Path:
    """``tiny_lstm`` pickled whole (torch.save of the module): loading it needs --trust-pickle."""
    import torch

    path = tmp_path / "lstm.pt"
    torch.save(tiny_lstm, path)
    return path
