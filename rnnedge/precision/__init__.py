"""Reduced precision (int8, fp16) by job: ``conversion`` (a float32 graph to a precision:
``convert``), ``providers`` (where the gate runs it), ``accuracy`` (``agreement``: fp32
against another precision on a task's inputs). The gate's policy for these graphs lives
in ``rnnedge.gate.policy``."""

from rnnedge.precision.accuracy import Agreement, agreement, run_graph
from rnnedge.precision.conversion import (
    CONVERTERS,
    PRECISIONS,
    check_precision,
    convert,
    op_counts,
    to_fp16,
    to_int8,
)
from rnnedge.precision.providers import cpu_fp32_fallback_nodes, gate_providers

__all__ = [
    "CONVERTERS",
    "PRECISIONS",
    "Agreement",
    "agreement",
    "check_precision",
    "convert",
    "cpu_fp32_fallback_nodes",
    "gate_providers",
    "op_counts",
    "run_graph",
    "to_fp16",
    "to_int8",
]
