"""The ONNX opsets rnnedge writes: a default and the range every part can handle."""

from __future__ import annotations

from rnnedge.errors import UsageError

DEFAULT_OPSET = 18
MIN_OPSET = 14

# onnxruntime 1.31 runs up to opset 26; graphs must load where they are gated.
RUNTIME_MAX_OPSET = 26


def max_opset() -> int:
    """The newest opset every part can handle: onnx, onnxscript's opset modules (whole
    models are translated through them) and onnxruntime."""
    import onnx
    import onnxscript

    scripted = max(n for n in range(MIN_OPSET, 40) if hasattr(onnxscript, f"opset{n}"))
    return min(onnx.defs.onnx_opset_version(), scripted, RUNTIME_MAX_OPSET)


def check_opset(opset: int | None) -> int:
    """The opset to use: ``DEFAULT_OPSET`` when None, else a validated integer."""
    if opset is None:
        return DEFAULT_OPSET
    newest = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UsageError(
            f"opset must be an integer from {MIN_OPSET} to {newest}, got {opset!r}; "
            f"leave it out for the default ({DEFAULT_OPSET})"
        )
    return opset
