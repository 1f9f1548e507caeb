"""rnnedge: recurrent PyTorch models to stateful step-wise ONNX graphs, and a runtime for them.

Importing ``rnnedge`` (or ``rnnedge.runtime``) never imports torch: the exporter is
loaded lazily on first use of ``rnnedge.export``, so edge devices need only numpy and
onnxruntime.
"""

from __future__ import annotations

from rnnedge.errors import (
    ContractError,
    DeviceError,
    ExportError,
    ModelLoadError,
    ParityError,
    RnnedgeError,
    StepInputError,
    UnsupportedModelError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "ContractError",
    "DeviceError",
    "ExportError",
    "ModelLoadError",
    "ParityError",
    "RnnedgeError",
    "StepInputError",
    "UnsupportedModelError",
    "UsageError",
    "export",
    "load",
    "__version__",
]


def __getattr__(name: str):
    # Lazy so that `import rnnedge` stays torch-free on devices that only run graphs.
    if name == "export":
        from rnnedge.exporters import export

        return export
    if name == "load":
        from rnnedge.runtime import load

        return load
    raise AttributeError(f"module 'rnnedge' has no attribute {name!r}")
