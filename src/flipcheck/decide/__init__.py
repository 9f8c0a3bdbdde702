"""From measuring to deciding: confidence bounds on budgets, sample-size planning, and the
allocation of per-layer compression choices under a damage budget (SPEC §10)."""
