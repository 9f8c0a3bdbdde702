"""Distance metrics between a parent P and a compressed child C: pure functions of numpy arrays.

After Dutta et al., "Accuracy is Not All You Need" (NeurIPS 2024, arXiv 2407.09141): compressed
models keep accuracy close to the parent while many individual answers flip, and flips and KL
divergence track the loss in free-form quality. Every function here takes per-question arrays of
the same instances scored by P and by C and returns plain Python numbers; nothing here knows about
models, lm-eval or files.

Conventions: ``correct_*`` are boolean arrays (one entry per question), ``pred_*`` are arrays of
predicted option indices (or any comparable answers), ``ll`` are summed log-likelihoods of each
option's continuation: either a list of 1-D arrays (questions may have different numbers of
options) or a 2-D array padded with ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError

#: largest number of resampled index rows drawn at once by the bootstrap (memory: rows x n x 8 bytes)
_BOOT_ELEMENTS = 4_000_000


def _bool(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise FlipcheckError(f"{name}: expected a 1-D array of booleans, got shape {arr.shape}")
    return arr.astype(bool)


def _pair(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _bool(a, f"{name}_P"), _bool(b, f"{name}_C")
    if x.shape != y.shape:
        raise FlipcheckError(f"{name}: parent has {x.size} questions, child {y.size}; they must be the same instances")
    return x, y


def accuracy(correct: Any) -> float | None:
    """acc = mean_i correct[i]; None for no questions."""
    c = _bool(correct, "correct")
    return float(c.mean()) if c.size else None


def delta_accuracy(correct_p: Any, correct_c: Any) -> float | None:
    """Δacc = acc_C − acc_P on the same questions."""
    p, c = _pair(correct_p, correct_c, "correct")
    if not p.size:
        return None
    return float(c.mean() - p.mean())


def bootstrap_delta_ci(
    correct_p: Any, correct_c: Any, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Paired bootstrap confidence interval of Δacc = acc_C − acc_P.

    Question indices are resampled with replacement (the same indices for P and C, which keeps the
    pairing), Δacc* = mean(d[idx]) with d_i = correct_C[i] − correct_P[i] is computed for each of
    `n_boot` resamples, and the interval is the (1−level)/2 and (1+level)/2 percentiles of Δacc*.
    Deterministic for a seed; vectorised in blocks so memory stays bounded for large tasks.
    """
    return stratified_bootstrap_delta_ci([(correct_p, correct_c)], [1.0], n_boot=n_boot, seed=seed, level=level)


def _boot_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """mean(d[idx]) for `n_boot` resamples idx of d's indices with replacement (in bounded blocks)."""
    n = d.size
    rows = max(1, _BOOT_ELEMENTS // n)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start : start + k] = d[idx].mean(axis=1)
    return means


def stratified_bootstrap_delta_ci(
    strata: Sequence[tuple[Any, Any]], weights: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Paired bootstrap interval of a weighted Δacc = Σ_s w_s (acc_C,s − acc_P,s) over strata (subtasks).

    Questions are resampled with replacement within each stratum s (keeping the pairing), Δacc* =
    Σ_s w_s mean(d_s[idx_s]) per resample, and the interval is the (1−level)/2 and (1+level)/2
    percentiles: the interval of an lm-eval group that averages its subtasks with weights w_s.
    """
    if len(strata) != len(weights):
        raise FlipcheckError(f"{len(strata)} strata but {len(weights)} weights")
    if n_boot < 1:
        raise FlipcheckError(f"n_boot must be at least 1 (got {n_boot})")
    if not 0.0 < level < 1.0:
        raise FlipcheckError(f"level must lie in (0, 1) (got {level})")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot, dtype=np.float64)
    used = False
    for (cp, cc), w in zip(strata, weights, strict=True):
        p, c = _pair(cp, cc, "correct")
        if p.size and w:
            total += w * _boot_means(c.astype(np.float64) - p.astype(np.float64), n_boot, rng)
            used = True
    if not used:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(total, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def flips(correct_p: Any, correct_c: Any) -> float | None:
    """Flip rate = mean_i [correct_P[i] != correct_C[i]]: correctness changed, either direction."""
    p, c = _pair(correct_p, correct_c, "correct")
    return float((p != c).mean()) if p.size else None


def proportion_ci(k: int, n: int, *, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (e.g. a slice's flip rate); None for n = 0.

    With p = k/n and z = Φ⁻¹((1 + level)/2):
    centre = (p + z²/2n) / (1 + z²/n),  half-width = z / (1 + z²/n) · sqrt(p(1 − p)/n + z²/4n²).
    Unlike p ± z·sqrt(p(1 − p)/n) it stays inside [0, 1] and is not empty at k = 0 (a slice with
    no flips among 10 questions: [0, 0.278]).
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise FlipcheckError(f"proportion: k={k} must lie in [0, n={n}]")
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # at k = 0 (k = n) the bound is 0 (1) exactly
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def quantile_bins(values: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, bin of each value) for `n_bins` quantile bins of finite `values`.

    Edges are the k/n_bins quantiles (linear interpolation), edges[0] = min, edges[-1] = max; value
    x goes to bin b = #{interior edges <= x}, so equal values share a bin and a run of ties that
    spans several edges leaves the bins in between empty.
    """
    if n_bins < 1:
        raise FlipcheckError(f"n_bins must be at least 1 (got {n_bins})")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    edges = np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1))
    return edges, np.searchsorted(edges[1:-1], v, side="right").astype(np.int64)


def first_difference(a: str | None, b: str | None) -> int | None:
    """Index of the first character where two texts differ; None when they are equal (or one is missing).

    When one text is a prefix of the other, the index is the shorter one's length (where it ends).
    """
    if a is None or b is None or a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def flip_directions(correct_p: Any, correct_c: Any) -> tuple[float, float] | None:
    """(c→i, i→c) = (mean_i [P right and C wrong], mean_i [P wrong and C right]).

    Both are fractions of all questions, so c→i + i→c = flips and i→c − c→i = Δacc.
    """
    p, c = _pair(correct_p, correct_c, "correct")
    if not p.size:
        return None
    return float((p & ~c).mean()), float((~p & c).mean())


def discordant_counts(correct_p: Any, correct_c: Any) -> tuple[int, int]:
    """(b, c) = (#P right and C wrong, #P wrong and C right): the discordant pairs McNemar tests."""
    p, c = _pair(correct_p, correct_c, "correct")
    return int((p & ~c).sum()), int((~p & c).sum())


def answer_changes(pred_p: Sequence[Any], pred_c: Sequence[Any]) -> float | None:
    """Answer-change rate = mean_i [pred_P[i] != pred_C[i]].

    Counts wrong → different-wrong changes too (the paper's "all flips"), so it is at least the
    flip rate.
    """
    if len(pred_p) != len(pred_c):
        raise FlipcheckError(f"pred: parent has {len(pred_p)} answers, child {len(pred_c)}; they must be the same instances")
    if not len(pred_p):
        return None
    return float(np.mean([a != b for a, b in zip(pred_p, pred_c, strict=True)]))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value on the discordant pairs.

    Under H0 (accuracy unchanged) each of the n = b + c discordant questions goes either way with
    probability 1/2, so with X ~ Bin(n, 1/2):

        p = min(1, 2 · P[X <= min(b, c)]) = min(1, 2 · Σ_{k=0}^{min(b,c)} C(n, k) / 2^n)

    and p = 1 when n = 0. Computed exactly with integers (no scipy needed).
    """
    if b < 0 or c < 0:
        raise FlipcheckError(f"McNemar counts must be non-negative (got b={b}, c={c})")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_p(correct_p: Any, correct_c: Any) -> float:
    """McNemar exact p-value for "the child's accuracy differs from the parent's"."""
    return mcnemar_exact(*discordant_counts(correct_p, correct_c))


def pad_options(ll: Any) -> np.ndarray:
    """Option log-likelihoods as a 2-D float array, ragged rows padded with -inf.

    Accepts a list of 1-D arrays (different numbers of options per question) or a 2-D array
    (already padded with -inf where a question has fewer options).
    """
    if isinstance(ll, np.ndarray) and ll.ndim == 2:
        return ll.astype(np.float64)
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in ll]
    if not rows:
        return np.zeros((0, 0), dtype=np.float64)
    width = max(r.size for r in rows)
    out = np.full((len(rows), width), -np.inf, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def option_log_probs(ll: Any) -> np.ndarray:
    """log p_i,j = ll[i,j] − logsumexp_j ll[i,·]: the log-softmax over each question's options.

    Padding (-inf) gets log-probability -inf (probability 0).
    """
    a = pad_options(ll)
    if a.size == 0:
        return a
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(a, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        lse = m + np.log(np.sum(np.exp(a - m), axis=1, keepdims=True))
        return a - lse


def option_probs(ll: Any) -> np.ndarray:
    """p_i = softmax_j(ll[i,·]): each question's distribution over its options (rows sum to 1)."""
    return np.exp(option_log_probs(ll))


def _check_option_counts(ll_p: Any, ll_c: Any) -> None:
    if isinstance(ll_p, np.ndarray) and ll_p.ndim == 2 or isinstance(ll_c, np.ndarray) and ll_c.ndim == 2:
        return
    if len(ll_p) != len(ll_c):
        raise FlipcheckError(f"options: parent has {len(ll_p)} questions, child {len(ll_c)}")
    for i, (a, b) in enumerate(zip(ll_p, ll_c, strict=True)):
        if np.asarray(a).size != np.asarray(b).size:
            raise FlipcheckError(
                f"question {i}: parent scored {np.asarray(a).size} options, child {np.asarray(b).size}; "
                "they must be the same instances"
            )


def kl_options(ll_p: Any, ll_c: Any) -> np.ndarray:
    """Per-question KL(p_P,i ‖ p_C,i) = Σ_j p_P,ij (log p_P,ij − log p_C,ij) over the options.

    p = softmax over the options' log-likelihoods. Terms with p_P,ij = 0 (padding) contribute 0;
    an option P gives mass that C gives none makes the KL +inf.
    """
    _check_option_counts(ll_p, ll_c)
    lp, lc = option_log_probs(ll_p), option_log_probs(ll_c)
    if lp.shape != lc.shape:
        raise FlipcheckError(f"options: parent array has shape {lp.shape}, child {lc.shape}")
    pp = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(pp > 0, pp * (lp - lc), 0.0)
    return terms.sum(axis=1)


def top_margin(ll: Any) -> np.ndarray:
    """margin_i = p_i,(1) − p_i,(2): gap between the most and second-most likely option.

    NaN for a question with fewer than two options.
    """
    p = option_probs(ll)
    if p.shape[0] == 0:
        return np.zeros(0)
    if p.shape[1] < 2:
        return np.full(p.shape[0], np.nan)
    top2 = -np.sort(-p, axis=1)[:, :2]
    m = top2[:, 0] - top2[:, 1]
    n_options = np.isfinite(pad_options(ll)).sum(axis=1)
    return np.where(n_options >= 2, m, np.nan)


def summary_stats(values: Any) -> dict[str, Any] | None:
    """mean, median, p95, p99 and max of the finite values; counts of values and of non-finite ones.

    None entries are skipped (not measured); ±inf values are left out of the statistics and
    counted in ``nonfinite`` (a child that gives an option zero probability makes KL infinite).
    Returns None when there is nothing to summarise.
    """
    raw = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).reshape(-1)
    measured = raw[~np.isnan(raw)]
    if measured.size == 0:
        return None
    fin = measured[np.isfinite(measured)]
    out: dict[str, Any] = {"n": int(measured.size), "nonfinite": int(measured.size - fin.size)}
    if fin.size == 0:
        out.update(mean=None, median=None, p95=None, p99=None, max=None)
        return out
    out.update(
        mean=float(fin.mean()),
        median=float(np.median(fin)),
        p95=float(np.quantile(fin, 0.95)),
        p99=float(np.quantile(fin, 0.99)),
        max=float(fin.max()),
    )
    return out


def vocab_kl_summary(kl_tokens: Any, top1_agree: Any | None = None) -> dict[str, Any] | None:
    """Summary of the per-token vocabulary KL pooled over all scored continuation tokens.

    kl_t = KL(P(·|ctx_t) ‖ C(·|ctx_t)) over the whole vocabulary at each scored position t, pooled
    over every request of every question: mean, median, p99 (as llama.cpp's ``--kl-divergence``
    reports), plus top-1 agreement = mean_t [argmax P(·|ctx_t) == argmax C(·|ctx_t)] over the same
    positions (those with a finite KL).
    """
    kl = np.asarray(kl_tokens, dtype=np.float64).reshape(-1)
    if kl.size == 0:
        return None
    fin = kl[np.isfinite(kl)]
    out: dict[str, Any] = {"tokens": int(kl.size), "nonfinite": int(kl.size - fin.size)}
    if fin.size:
        out.update(mean=float(fin.mean()), median=float(np.median(fin)), p99=float(np.quantile(fin, 0.99)))
    else:
        out.update(mean=None, median=None, p99=None)
    if top1_agree is not None:
        t = np.asarray(top1_agree, dtype=np.float64).reshape(-1)
        t = t[np.isfinite(kl)] if t.shape == kl.shape else t
        out["top1_agree"] = float(t.mean()) if t.size else None
    return out


def margin_by_correctness(margin: Any, correct_p: Any) -> tuple[float | None, float | None]:
    """(mean margin of the questions P answers correctly, mean margin of those it gets wrong).

    The paper's explanation of flips: wrong answers sit close to the decision boundary (small
    margin), so a small perturbation changes them. NaN margins are skipped.
    """
    m = np.asarray(margin, dtype=np.float64).reshape(-1)
    c = _bool(correct_p, "correct_P")
    if m.shape != c.shape:
        raise FlipcheckError(f"margin has {m.size} entries, correct_P {c.size}")
    ok = ~np.isnan(m)

    def mean(mask: np.ndarray) -> float | None:
        sel = m[mask & ok]
        return float(sel.mean()) if sel.size else None

    return mean(c), mean(~c)


def flip_rate_by_margin_decile(margin: Any, flipped: Any, n_bins: int = 10) -> list[dict[str, Any]]:
    """Flip rate in each quantile bin (deciles by default) of the parent's top margin.

    Bin edges are the k/n_bins quantiles of P's margins (linear interpolation); question i goes to
    bin b = #{interior edges <= margin_i}, so equal margins always share a bin and a run of tied
    margins that spans several edges leaves the bins in between empty (n = 0, flip_rate None).
    Questions with NaN margins are left out. Returns one dict per bin:
    ``{"bin", "lo", "hi", "n", "flips", "flip_rate"}``.
    """
    if n_bins < 1:
        raise FlipcheckError(f"n_bins must be at least 1 (got {n_bins})")
    m = np.asarray(margin, dtype=np.float64).reshape(-1)
    f = _bool(flipped, "flipped")
    if m.shape != f.shape:
        raise FlipcheckError(f"margin has {m.size} entries, flipped {f.size}")
    ok = ~np.isnan(m)
    m, f = m[ok], f[ok]
    if m.size == 0:
        return []
    edges, bins = quantile_bins(m, n_bins)
    out = []
    for b in range(n_bins):
        sel = bins == b
        n = int(sel.sum())
        k = int(f[sel].sum())
        out.append(
            {
                "bin": b,
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": n,
                "flips": k,
                "flip_rate": k / n if n else None,
            }
        )
    return out


def pearson(x: Any, y: Any) -> float | None:
    """Pearson correlation r = cov(x, y) / (σ_x σ_y) over the pairs where both are finite.

    None with fewer than two pairs or when either side is constant.
    """
    a = np.asarray([np.nan if v is None else v for v in x], dtype=np.float64).reshape(-1)
    b = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise FlipcheckError(f"pearson: x has {a.size} values, y {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if den == 0.0:
        return None
    return float((da * db).sum() / den)
