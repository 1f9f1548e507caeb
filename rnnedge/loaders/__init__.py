"""Model files: state_dict + arch, TorchScript, torch.export .pt2, pickles.

``load_model`` reads any of them into an eval-mode module; ``parse_input_shape`` and
``make_example`` give the example input the exporter traces with.
"""

from rnnedge.loaders.arch import build_arch
from rnnedge.loaders.inputs import (
    forward_order,
    make_example,
    make_examples,
    parse_input,
    parse_input_shape,
)
from rnnedge.loaders.model_file import load_model
from rnnedge.loaders.pt2 import ProgramStep

__all__ = ["ProgramStep", "build_arch", "forward_order", "load_model", "make_example",
           "make_examples", "parse_input", "parse_input_shape"]
