"""llama.cpp's KL statistics for text corpora, figure for figure, with intervals llama.cpp does not give.

``llama-perplexity --kl-divergence`` (llama.cpp, tools/perplexity) prints, over every scored token
of the base model P and the quantized model Q:

- "KL divergence statistics": KLD = KL(P‖Q) per token; Mean ± uncertainty, Maximum, the 99.9, 99.0,
  95.0 and 90.0 % percentiles, Median, 10.0, 5.0, 1.0, 0.1 %, Minimum;
- "Token probability statistics": Δp = Q(next) − P(next), the change of the actual next token's
  probability, in per cent: Mean ± uncertainty, Maximum, 99.9, 99.0, 95.0, 90.0, 75.0 %, Median,
  25.0, 10.0, 5.0, 1.0, 0.1 %, Minimum; RMS Δp ± uncertainty; "Same top p", the share of tokens
  whose top-1 tokens agree, ± uncertainty.

Computed here as llama.cpp computes them: percentile(x, f) is the linear interpolation between the
sorted values at rank f·(n − 1) (numpy's default), the median the middle value (or the mean of the
two); Mean ± u with u = sqrt((mean(x²) − mean(x)²)/(n − 1)) when that variance is positive and
n > 10, else 0; RMS Δp = sqrt(mean(Δp²)) ± 0.5/RMS · u(Δp²); Same top p = s ± sqrt(s(1 − s)/(n − 1)).
llama.cpp scores the second half of each window (``--scoring half`` here, with ``--ctx`` its ``-c``).

Added here: a 95 % bootstrap interval on each tail percentile (99.9 … 90 % and 10 … 0.1 %, of KLD
and Δp), resampling whole windows (tokens of one window are not independent), since a tail
percentile of a few thousand tokens rests on a handful of them; and KL bucketed by the parent's
top-token probability max_v P(v | ctx), because a mean KL is dominated by the positions where the
parent is itself undecided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

KLD_ROWS = (("Maximum", "max"), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.90),
            ("Median", "median"), ("10.0%", 0.10), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001),
            ("Minimum", "min"))
DP_ROWS = (("Maximum", "max"), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.90),
           ("75.0%", 0.75), ("Median", "median"), ("25.0%", 0.25), ("10.0%", 0.10), (" 5.0%", 0.05),
           (" 1.0%", 0.01), (" 0.1%", 0.001), ("Minimum", "min"))
TAILS = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)  # the percentiles given a bootstrap interval
P_TOP_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0)  # buckets of the parent's top-token probability


def mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's Mean ± u: u = sqrt((mean(x²) − mean(x)²)/(n − 1)) if that variance > 0 and n > 10, else 0."""
    n = x.size
    if n == 0:
        return 0.0, 0.0
    mean = float(np.mean(x, dtype=np.float64))
    var = float(np.mean(np.square(x, dtype=np.float64))) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _key(q: Any) -> str:
    return q if isinstance(q, str) else f"p{100 * q:g}"


def _stats(x: np.ndarray, rows) -> dict[str, float]:
    s = np.sort(x.astype(np.float64))
    out = {}
    for _, q in rows:
        if q == "max":
            out["max"] = float(s[-1])
        elif q == "min":
            out["min"] = float(s[0])
        elif q == "median":
            out["median"] = float(np.median(s))
        else:
            out[_key(q)] = float(np.quantile(s, q))
    return out


def _tail_intervals(x: np.ndarray, window: np.ndarray, n_boot: int, seed: int) -> dict[str, list[float]] | None:
    """95 % percentile-bootstrap intervals of the tail percentiles, resampling whole windows."""
    if n_boot <= 0 or x.size < 2:
        return None
    order = np.argsort(window, kind="stable")
    x, window = x[order], window[order]
    _, starts, counts = np.unique(window, return_index=True, return_counts=True)
    if len(starts) < 2:
        return None
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, len(TAILS)))
    for b in range(n_boot):
        pick = rng.integers(0, len(starts), size=len(starts))
        sample = np.concatenate([x[starts[i] : starts[i] + counts[i]] for i in pick])
        reps[b] = np.quantile(sample, TAILS)
    lo, hi = np.quantile(reps, [0.025, 0.975], axis=0)
    return {_key(q): [float(a), float(b)] for q, a, b in zip(TAILS, lo, hi, strict=True)}


def kl_by_parent_confidence(kl: np.ndarray, p_top: np.ndarray) -> list[dict[str, Any]]:
    """Per bucket [lo, hi) of the parent's top-token probability (the last one closed): tokens, share of
    tokens, mean KL and the bucket's share of the summed KL."""
    total = float(kl.sum(dtype=np.float64))
    out = []
    for i, (lo, hi) in enumerate(zip(P_TOP_EDGES, P_TOP_EDGES[1:], strict=False)):
        last = i == len(P_TOP_EDGES) - 2
        sel = (p_top >= lo) & ((p_top <= hi) if last else (p_top < hi))
        k = kl[sel]
        out.append({"p_top": [lo, hi], "tokens": int(sel.sum()), "share": float(sel.mean()) if sel.size else 0.0,
                    "kl_mean": float(k.mean(dtype=np.float64)) if k.size else None,
                    "kl_share": float(k.sum(dtype=np.float64) / total) if k.size and total > 0 else None})
    return out


def llama_block(kl: np.ndarray, dp: np.ndarray, agree: np.ndarray, window: np.ndarray, *, n_boot: int = 1000,
                seed: int = 0) -> dict[str, Any] | None:
    """The figures of ``llama-perplexity --kl-divergence`` over the given tokens (NaN/inf left out by the
    caller), plus bootstrap intervals on the tail percentiles; Δp as a fraction (printed in per cent)."""
    kl, dp = np.asarray(kl, dtype=np.float64), np.asarray(dp, dtype=np.float64)
    n = kl.size
    if n == 0:
        return None
    window = np.asarray(window)
    kld_mean, kld_u = mean_and_uncertainty(kl)
    dp_mean, dp_u = mean_and_uncertainty(dp)
    mse, mse_u = mean_and_uncertainty(dp * dp)
    rms = math.sqrt(mse)
    same = float(np.mean(agree))
    return {
        "tokens": int(n),
        "kld": {"mean": kld_mean, "mean_unc": kld_u, **_stats(kl, KLD_ROWS),
                "ci": _tail_intervals(kl, window, n_boot, seed)},
        "dp": {"mean": dp_mean, "mean_unc": dp_u, **_stats(dp, DP_ROWS),
               "ci": _tail_intervals(dp, window, n_boot, seed + 1)},
        "rms_dp": {"value": rms, "unc": 0.5 / rms * mse_u if rms > 0 else 0.0},
        "same_top": {"value": same, "unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0},
    }


def _ci(block: Mapping[str, Any], key: str, scale: float, fmt: str) -> str:
    ci = (block.get("ci") or {}).get(key)
    return f"   [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]" if ci else ""


def format_block(block: Mapping[str, Any], *, intervals: bool = True) -> list[str]:
    """The lines as llama.cpp prints them (same names, order and number formats); with `intervals`, a
    tail percentile is followed by its bootstrap interval in brackets."""
    k, d = block["kld"], block["dp"]
    lines = ["====== KL divergence statistics ======", f"Mean    KLD: {k['mean']:10.6f} ± {k['mean_unc']:10.6f}"]
    for name, q in KLD_ROWS:
        extra = _ci(k, _key(q), 1.0, ".6f") if intervals and q in TAILS else ""
        lines.append(f"{name + ' ' * (7 - len(name))} KLD: {k[_key(q)]:10.6f}{extra}")
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * d['mean']:6.3f} ± {100 * d['mean_unc']:5.3f} %"]
    for name, q in DP_ROWS:
        extra = _ci(d, _key(q), 100.0, ".3f") if intervals and q in TAILS else ""
        lines.append(f"{name + ' ' * (7 - len(name))} Δp: {100 * d[_key(q)]:6.3f}%{extra}")
    r, s = block["rms_dp"], block["same_top"]
    lines.append(f"RMS Δp    : {100 * r['value']:6.3f} ± {100 * r['unc']:5.3f} %")
    lines.append(f"Same top p: {100 * s['value']:6.3f} ± {100 * s['unc']:5.3f} %")
    return lines
