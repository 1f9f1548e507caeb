"""rnnedge's fixes for torch.onnx (dynamo) failures that have nothing to do with recurrence.

Real recurrent models fail in torch.onnx.export on ops around their layers; each fix here
is the smallest change that lets the op through, with the same numbers:

- ``aten.clamp`` with one int and one float bound on a float tensor (SincNet's
  ``torch.clamp(low + band, 50, sample_rate / 2)`` in pyannote): torch.onnx's type
  promotion pass turns the int bound into a tensor and then finds no clamp overload for
  (Tensor, Tensor, float). While tracing, ``mode`` (a TorchFunctionMode) makes both
  bounds floats when either is one, which is what PyTorch's promotion computes anyway.
- ``aten.sym_stride`` (``x.stride()`` on a dynamic shape, e.g. demucs's ``unfold`` built
  on ``as_strided``): torch.onnx has no translation. ``translations`` gives one: the
  stride of a contiguous tensor, the product of the sizes after the axis.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CLAMPS = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _FloatBounds(TorchFunctionMode):
    """clamp/clip with one int and one float bound: both bounds as floats."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _CLAMPS:
            args = list(args)
            bounds = [args[k] if len(args) > k else kwargs.get(name)
                      for k, name in ((1, "min"), (2, "max"))]
            if any(isinstance(b, float) for b in bounds):
                for (k, name), b in zip(((1, "min"), (2, "max")), bounds):
                    if _is_int(b):
                        if len(args) > k:
                            args[k] = float(b)
                        else:
                            kwargs[name] = float(b)
        return func(*args, **kwargs)


def mode() -> TorchFunctionMode:
    """The context to trace under: clamp bounds made torch.onnx-friendly."""
    return _FloatBounds()


def translations(opset: int) -> dict:
    """torch.onnx.export translations rnnedge supplies for ops it has none for."""
    import onnxscript

    op = getattr(onnxscript, f"opset{max(opset, 18)}")

    def sym_stride(x, dim: int):
        # A traced tensor is contiguous (torch.export's tensors are): the stride of axis
        # ``dim`` is the product of the sizes after it (1 for the last axis).
        if dim == -1:
            return op.Constant(value_int=1)
        return op.ReduceProd(op.Shape(x, start=dim + 1), keepdims=0)

    return {torch.ops.aten.sym_stride.int: sym_stride}
