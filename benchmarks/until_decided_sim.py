"""Is `eval --until-decided` right as often as it claims, and how many questions does it save?

    PYTHONPATH=src python benchmarks/until_decided_sim.py [RUNS] [BUDGET] [CONFIDENCE] [BATCH] [QUESTIONS]

Simulates RUNS (default 2,000) sequential gates per true flip rate, on both sides of BUDGET (2 %):
each question flips with the true rate, independently; after every BATCH (50) questions the betting
confidence sequence of `flipcheck.decide.sequential` is asked for a verdict, exactly as
`eval --until-decided` asks it; a run stops at the first PASS or FAIL or after QUESTIONS (10,000).

Printed per rate: the share of wrong verdicts (PASS while the rate is over the budget, FAIL while it
is at or under it), the share decided before the questions ran out, the mean and 90th percentile of
the questions used, and the fixed n of `flipcheck plan` for comparison: planned for a child at half
the budget (what a user who does not know the rate would plan), and planned for the true rate
itself (an oracle plan; only under the budget). "saved" = 1 − mean n / planned n at half the budget.
"right" compares the two gates' verdicts (PASS when the rate is within the budget, FAIL when over):
the sequential one's (a run that runs out is judged by its last upper bound, FAIL here) and the
fixed-n gate's on plan(B/2) questions (its Clopper–Pearson bound, exact binomial probabilities).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from scipy import stats

from flipcheck.decide.sequential import thresholds
from flipcheck.evaluation.confidence import cp_upper, plan_questions


def main(runs: int = 2000, budget: float = 0.02, confidence: float = 0.95, batch: int = 50, questions: int = 10_000) -> None:
    alpha = 1 - confidence
    ns = np.arange(batch, questions + 1, batch)
    t0 = time.perf_counter()
    passes, fails = thresholds(ns, budget, alpha)
    half = plan_questions(budget, budget / 2, confidence).questions
    print(f"budget {budget:.1%}, confidence {confidence:.0%}, rounds of {batch}, at most {questions} questions, {runs} runs per rate; "
          f"fixed-n plan at half the budget: {half} questions (thresholds {time.perf_counter() - t0:.1f} s)")
    k_pass = max((k for k in range(half + 1) if cp_upper(k, half, confidence) <= budget), default=-1)
    print(f"{'rate':>7} {'wrong':>7} {'decided':>8} {'mean n':>8} {'p90 n':>7} {'plan(rate)':>10} {'saved vs plan(B/2)':>19} "
          f"{'right':>7} {'fixed-n right':>14}")
    rng = np.random.default_rng(0)
    total_wrong = total = 0
    for rate in (0.0, 0.25 * budget, 0.5 * budget, 0.75 * budget, budget, 1.25 * budget, 1.5 * budget, 2 * budget, 4 * budget):
        flips = np.zeros((runs, len(ns)), dtype=np.int64)
        acc = np.zeros(runs, dtype=np.int64)
        for k in range(len(ns)):  # binomial increments per round: the same law as question by question
            acc += rng.binomial(batch, rate, size=runs)
            flips[:, k] = acc
        said_pass, said_fail = flips <= passes, flips >= fails
        end = len(ns)
        first_pass = np.where(said_pass.any(1), said_pass.argmax(1), end)
        first_fail = np.where(said_fail.any(1), said_fail.argmax(1), end)
        stop = np.minimum(first_pass, first_fail)
        n_used = ns[np.minimum(stop, end - 1)]
        decided = stop < end
        wrong = (first_pass < first_fail) if rate > budget else (first_fail < first_pass)
        total_wrong, total = total_wrong + int(wrong.sum()), total + runs
        oracle = plan_questions(budget, rate, confidence).questions if rate < budget else None
        right = (first_pass < first_fail).mean() if rate <= budget else 1 - (first_pass < first_fail).mean()
        fixed_pass = float(stats.binom.cdf(k_pass, half, rate)) if k_pass >= 0 else 0.0
        fixed_right = fixed_pass if rate <= budget else 1 - fixed_pass
        print(f"{rate:7.2%} {wrong.mean():7.2%} {decided.mean():8.1%} {n_used.mean():8.0f} {np.percentile(n_used, 90):7.0f} "
              f"{'' if oracle is None else oracle:>10} {1 - n_used.mean() / half:19.0%} {right:7.1%} {fixed_right:14.1%}")
    print(f"all rates: {total_wrong} wrong verdicts in {total} runs ({total_wrong / total:.2%}); "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(*(int(a[0]),) if a[0:1] else (), *(float(x) for x in a[1:3]), *(int(x) for x in a[3:5]))
