"""Predicted against measured: does the search's additive damage model rank its candidates right?

The search proposes with the additive prediction D(a) = Σ_l d[l, a_l] (each layer's sensitivity, the
text KL of that layer swapped into the parent alone; :mod:`.search`), and verifies by measuring. Per
candidate the report puts D(a) beside what was measured: the KL over options and the flips over all
questions (the micro figures; the only task's where there is one), and the text KL of each --text
corpus. Over the candidates it gives Spearman's rank correlation ρ between D and each measured
figure (Spearman 1904; ρ = Pearson's correlation of the ranks, ties given their mean rank): ρ near 1
says the cheap prediction orders children as the real evaluation does, so the knapsack's proposals
are worth verifying; ρ near 0 or below says damage does not add up over layers here (interactions,
or a probe text unlike the tasks), and the search is leaning on its verification and repair steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def measured(row: Mapping[str, Any]) -> dict[str, float | None]:
    """A candidate row's measured figures over all its questions (micro, else its only task) and corpora."""
    s = row.get("micro") or (next(iter(row["tasks"].values())) if len(row.get("tasks") or {}) == 1 else None)
    texts = [c["kl"] for c in (row.get("corpus") or {}).values() if c.get("kl") is not None]
    return {"kl": None if s is None else s.get("kl"), "flips": None if s is None else s.get("flips"),
            "kl_text": float(np.mean(texts)) if texts else None}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ of paired values (ties: mean ranks); None with fewer than 3 pairs or a constant side."""
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def additivity(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Add ``predicted`` and ``measured`` to every candidate row; return ρ per measured figure."""
    out: dict[str, Any] = {"n": 0}
    pairs: dict[str, tuple[list[float], list[float]]] = {"kl": ([], []), "flips": ([], []), "kl_text": ([], [])}
    for r in rows:
        r["predicted"] = r.get("damage")
        r["measured"] = m = measured(r)
        if r["predicted"] is None:
            continue
        out["n"] += 1
        for k, v in m.items():
            if v is not None:
                pairs[k][0].append(float(r["predicted"]))
                pairs[k][1].append(float(v))
    for k, (x, y) in pairs.items():
        out[f"spearman_{k}"] = spearman(x, y)
    return out
