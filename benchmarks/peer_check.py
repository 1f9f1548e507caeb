"""Does torch's own exporter keep recurrent graphs correct at other lengths? rnnedge vs torch.onnx.

Exports each layer from an example of length 5 (and from T=1, B=1) with
``torch.onnx.export`` (dynamo, the default; and the legacy TorchScript exporter) and with
``rnnedge.export``, then runs every graph in onnxruntime at lengths 1, 7 and 10 with batch 3
and compares with eager PyTorch. Prints one row per (layer, exporter, example).

    python benchmarks/peer_check.py 2>/dev/null   # the legacy exporter prints its IR on failure
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import rnnedge

LAYERS = {
    "LSTM time-major": lambda: nn.LSTM(8, 16),
    "GRU time-major": lambda: nn.GRU(8, 16),
    "RNN batch-first": lambda: nn.RNN(8, 16, batch_first=True),
    "LSTM proj_size": lambda: nn.LSTM(8, 16, proj_size=4, batch_first=True),
}


def _example(model, batch, time):
    shape = (batch, time, 8) if model.batch_first else (time, batch, 8)
    return torch.randn(shape)


def _torch_export(model, example, path, dynamo):
    dims = {0: "batch", 1: "time"} if model.batch_first else {0: "time", 1: "batch"}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (example,), path, dynamo=True,
                              dynamic_shapes=({k: v for k, v in dims.items()},))
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": dims})


def _check(path, model):
    """'ok' or what went wrong, at T in (1, 7, 10), batch 3."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the failures are the finding; ORT's own log is noise here
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    for time in (1, 7, 10):
        x = _example(model, 3, time)
        feeds = {name: x.numpy()}
        for extra in sess.get_inputs()[1:]:  # rnnedge graphs take the state explicitly
            shape = [3 if d == "batch" else d for d in extra.shape]
            feeds[extra.name] = np.zeros(shape, np.float32)
        try:
            got = sess.run(None, feeds)[0]
        except Exception as exc:  # noqa: BLE001
            return f"fails at T={time}: {str(exc).splitlines()[0][:60]}"
        with torch.no_grad():
            want = model(x)[0].numpy()
        if got.shape != want.shape:
            return f"wrong shape at T={time}: {got.shape}"
        worst = max(worst, float(np.abs(got - want).max()))
    return "ok" if worst < 1e-4 else f"WRONG values (max abs err {worst:.2g})"


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"{'layer':<18} {'example':<10} {'exporter':<16} result")
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in LAYERS.items():
            model = make().eval()
            for batch, time in ((2, 5), (1, 1)):
                example = _example(model, batch, time)
                for exporter in ("torch dynamo", "torch legacy", "rnnedge"):
                    path = os.path.join(tmp, "m.onnx")
                    try:
                        if exporter == "rnnedge":
                            rnnedge.export(model, path, example_input=example)
                        else:
                            _torch_export(model, example, path, exporter == "torch dynamo")
                        result = _check(path, model)
                    except Exception as exc:  # noqa: BLE001
                        result = f"export fails: {str(exc).strip().splitlines()[0][:60]}"
                    print(f"{label:<18} {f'B={batch} T={time}':<10} {exporter:<16} {result}")


if __name__ == "__main__":
    main()
