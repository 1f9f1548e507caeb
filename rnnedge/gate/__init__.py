"""The parity gate: plans, cases, comparisons, tolerances, one runner."""
