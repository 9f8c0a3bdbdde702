"""Intervals for questions that come in clusters: the subjects of MMLU, the subtasks of any group.

The plain intervals of a task treat its questions as independent draws. The questions of a group are
not: they come subject by subject, and a child that damaged one subject flips many of its questions
together. When the population a user cares about is "questions of subjects like these", the subject
is the unit that was sampled, and the interval must resample subjects (a cluster bootstrap; Davison &
Hinkley 1997, "Bootstrap methods and their application", §3.8; Field & Welsh 2007, "Bootstrapping
clustered data", JRSS-B 69:369–390, for its validity as the number of clusters grows).

For clusters k = 1 … K with n_k questions and per-question values x_ki (flips: [correct_P ≠ correct_C];
Δacc: correct_C − correct_P), the pooled figure is θ = Σ_k Σ_i x_ki / Σ_k n_k (a size-weighted group,
lm-eval's default). A resample draws K clusters with replacement, k*_1 … k*_K, and computes
θ* = Σ_j S_{k*_j} / Σ_j n_{k*_j} with S_k = Σ_i x_ki; the interval is the (1 − level)/2 and
(1 + level)/2 percentiles of θ* over `n_boot` resamples. With a handful of clusters the percentiles
are rough (K = 2 clusters give at most 3 distinct values); the report states K beside the interval.

Reported beside, not instead of, the plain ones: the ratio of the two widths squared is the design
effect (Kish 1965), how many independent questions one clustered question is worth the inverse of.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.metrics import proportion_ci


def cluster_bootstrap_ci(clusters: Sequence[Any], *, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the pooled mean of per-question values, resampling whole clusters
    (module docstring). None with fewer than 2 non-empty clusters."""
    if n_boot < 1:
        raise FlipcheckError(f"n_boot must be at least 1 (got {n_boot})")
    if not 0.0 < level < 1.0:
        raise FlipcheckError(f"level must lie in (0, 1) (got {level})")
    arrays = [np.asarray(c, dtype=np.float64).ravel() for c in clusters]
    arrays = [a for a in arrays if a.size]
    if len(arrays) < 2:
        return None
    sums = np.array([a.sum() for a in arrays])
    sizes = np.array([a.size for a in arrays], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
    est = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(est, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def clustered_figures(pairs: Mapping[str, tuple[Any, Any]], *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any] | None:
    """Flips and Δacc intervals of a group clustered by subtask, with the plain flips interval (Wilson,
    questions independent) beside for the design effect. `pairs`: per subtask (correct_P, correct_C)."""
    flips, deltas = [], []
    for p, c in pairs.values():
        p, c = np.asarray(p, dtype=bool), np.asarray(c, dtype=bool)
        flips.append(p != c)
        deltas.append(c.astype(np.float64) - p.astype(np.float64))
    k = sum(1 for f in flips if f.size)
    f_ci = cluster_bootstrap_ci(flips, n_boot=n_boot, seed=seed, level=level)
    d_ci = cluster_bootstrap_ci(deltas, n_boot=n_boot, seed=seed + 1, level=level)
    if f_ci is None or d_ci is None:
        return None
    n = int(sum(f.size for f in flips))
    plain = proportion_ci(int(sum(int(f.sum()) for f in flips)), n, level=level)
    effect = None
    if plain is not None and plain[1] > plain[0]:
        effect = ((f_ci[1] - f_ci[0]) / (plain[1] - plain[0])) ** 2
    return {"by": "subtask", "clusters": k, "level": level, "flips_ci": list(f_ci), "delta_acc_ci": list(d_ci),
            "flips_ci_plain": list(plain) if plain else None, "design_effect_flips": effect}
