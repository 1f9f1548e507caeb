"""Exporters: PyTorch recurrent models to stateful step-wise ONNX graphs."""

from rnnedge.exporters.api import ExportReport, export

__all__ = ["ExportReport", "export"]
