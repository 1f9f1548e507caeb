"""Exporters: PyTorch recurrent models to stateful step-wise ONNX graphs.

``export`` (``api``: the pipeline), ``ExportOptions`` (``options``: every option checked
before any work), ``ExportReport``, and ``verify`` (``verify``: the gate re-run on a
written file). Planning: ``layers`` (bare nn.RNN/LSTM/GRU and cells, no tracing) and
``models`` (whole models: ``inputs``, ``stepping``, ``forms``, traced through ``trace`` and
``torchonnx``); ``inference`` holds ``inference_mode``, shared by export and verify.

``export``, ``ExportReport`` and ``ExportOptions`` load on first use: importing the
package imports neither torch nor the tracing machinery.
"""

from __future__ import annotations

# Imported eagerly (it is torch-free) so that ``rnnedge.exporters.verify`` is always this
# function: a lazy one would be shadowed by the submodule of the same name once loaded.
from rnnedge.exporters.verify import verify

__all__ = ["ExportOptions", "ExportReport", "export", "verify"]

_LAZY = {"export": "rnnedge.exporters.api", "ExportReport": "rnnedge.exporters.api",
         "ExportOptions": "rnnedge.exporters.options"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rnnedge.exporters' has no attribute {name!r}")
