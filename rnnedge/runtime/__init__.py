"""The rnnedge runtime: load a stateful ONNX graph and stream it, with numpy and onnxruntime only.

    model = rnnedge.load("model.onnx")          # device="auto", threads=None (1)
    stream = model.stream(batch=1)
    y = stream.step(x)                           # one step or chunk; the state is carried
    y_all = stream.run(x_long, chunk=160)        # a long input in chunks

    pool = model.pool()                          # many single-row streams, one batched call
    a, b = pool.add(), pool.add()
    outs = pool.step({a: xa, b: xb})

Never imports torch (edge devices do not have it). See docs/runtime.md.
"""

from rnnedge.runtime.contract import Contract, StateInfo, TensorInfo
from rnnedge.runtime.model import Model, load
from rnnedge.runtime.pool import Pool
from rnnedge.runtime.providers import DeviceFallbackWarning
from rnnedge.runtime.stream import Stream

__all__ = [
    "Contract",
    "DeviceFallbackWarning",
    "Model",
    "Pool",
    "StateInfo",
    "Stream",
    "TensorInfo",
    "load",
]
