"""Triton Inference Server: the batch-first variant, its config.pbtxt, the model repository."""

from rnnedge.triton.config import config_text
from rnnedge.triton.repository import (
    check_name,
    check_target,
    staged_repository,
    write_repository,
)
from rnnedge.triton.variant import (
    batch_first_graph,
    batch_first_plan,
    batch_first_spec,
    prepare_variant,
)

__all__ = [
    "batch_first_graph",
    "batch_first_plan",
    "batch_first_spec",
    "check_name",
    "check_target",
    "config_text",
    "prepare_variant",
    "staged_repository",
    "write_repository",
]
