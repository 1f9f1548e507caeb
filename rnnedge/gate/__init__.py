"""The parity gate: the exported graph must equal eager PyTorch, or the export fails.

- ``plan``: the ``Plan`` an export builds (spec, graph, eager reference, seeded sample);
- ``lengths``: over which lengths (``LengthRange``; min_length/max_length checked);
- ``cases``: the cases as data (``Case``) and how one is run through graph and eager;
- ``referee``: the float64 run of the model the graph is judged against, where it runs;
- ``nonfinite``: whether a NaN in the input propagates (a fact for the contract);
- ``compare``: per-tensor figures of one case (max abs, max rel, drift);
- ``tolerance`` / ``policy``: what counts as a pass, per dtype and precision;
- ``runner``: ``run_gate(plan, model_bytes, policy) -> GateResult``, the one runner;
- ``verdict``: the metadata summary, per-tensor worst figures, the failure messages and
  the ParityError.
"""

from rnnedge.gate.cases import Case, gate_cases
from rnnedge.gate.compare import TensorResult
from rnnedge.gate.lengths import DEFAULT_MAX, LengthRange, check_length_range
from rnnedge.gate.plan import Plan
from rnnedge.gate.policy import DRIFT, PRECISIONS, Policy, policy_for
from rnnedge.gate.runner import CaseResult, GateResult, run_gate
from rnnedge.gate.tolerance import TOLERANCES
from rnnedge.gate.verdict import (
    TensorSummary,
    model_failure,
    per_tensor,
    raise_on_failure,
    summarize,
    tensor_failure,
)

__all__ = [
    "DEFAULT_MAX",
    "DRIFT",
    "PRECISIONS",
    "TOLERANCES",
    "Case",
    "CaseResult",
    "GateResult",
    "LengthRange",
    "Plan",
    "Policy",
    "TensorResult",
    "TensorSummary",
    "check_length_range",
    "gate_cases",
    "model_failure",
    "per_tensor",
    "policy_for",
    "raise_on_failure",
    "run_gate",
    "summarize",
    "tensor_failure",
]
