"""Commands on flip budgets: gate (judge a report against them) and plan (the questions one needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import console, run_guarded, verdict
from flipcheck.gate import parse_budget, run_gate


def gate_cmd(
    report: Annotated[Path, typer.Argument(help="report.json (or its folder) from eval/run/sweep")],
    max_flips: Annotated[str | None, typer.Option(help="largest allowed flip rate, e.g. 2% or 0.02")] = None,
    max_kl: Annotated[str | None, typer.Option(help="largest allowed mean KL, e.g. 0.01")] = None,
    min_acc_delta: Annotated[str | None, typer.Option(help="smallest allowed accuracy change, e.g. -1%")] = None,
    min_acc: Annotated[str | None, typer.Option(help="smallest allowed child accuracy, e.g. 60%")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="judge acc or acc_norm where a task has it (default: the report's headline)")] = None,
    max_kl_text: Annotated[str | None, typer.Option(help="largest allowed mean KL(P‖C) per token on each text corpus, e.g. 0.02")] = None,
    max_ppl_ratio: Annotated[str | None, typer.Option(help="largest allowed PPL_child / PPL_parent on each text corpus, e.g. 1.05")] = None,
    over_floor: Annotated[bool, typer.Option("--over-floor", help="judge flips and KL as the excess over the report's noise floor")] = False,
    min_judge_delta: Annotated[str | None, typer.Option(help="smallest allowed judged score change (1-10 scale), e.g. -0.5")] = None,
    confidence: Annotated[str | None, typer.Option(help="judge flips by their one-sided Clopper-Pearson upper bound and Δacc by its lower bound at this level, e.g. 0.95 (default: point estimates)")] = None,
    min_survival: Annotated[str | None, typer.Option(help="smallest allowed share of generations identical to the parent's through T tokens, T:SHARE, e.g. 128:90%")] = None,
    max_length_ratio: Annotated[str | None, typer.Option(help="largest allowed median of generated tokens child / parent, e.g. 1.1")] = None,
) -> None:
    """Exit 0 when every child and task is within budget, 1 otherwise (one verdict line each)."""
    def go():
        ok = run_gate(report, max_flips=max_flips, max_kl=max_kl, min_acc_delta=min_acc_delta, min_acc=min_acc,
                      metric=metric, max_kl_text=max_kl_text, max_ppl_ratio=max_ppl_ratio, over_floor=over_floor,
                      min_judge_delta=min_judge_delta, echo=verdict, confidence=confidence,
                      min_survival=min_survival, max_length_ratio=max_length_ratio)
        raise typer.Exit(0 if ok else 1)

    run_guarded(go)


def plan_cmd(
    max_flips: Annotated[str, typer.Option(help="the flip budget to decide, e.g. 2%")],
    expected: Annotated[str, typer.Option(help="the flip rate you expect the child to have, e.g. 1% (below --max-flips)")],
    confidence: Annotated[str, typer.Option(help="confidence of the gate, e.g. 0.95")] = "0.95",
    confirm: Annotated[str | None, typer.Option(help="also for `search --confirm SHARE`: the questions each split needs")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="with --confirm: search's --max-candidates (its split is judged at 1 - (1 - c)/K)")] = 8,
) -> None:
    """How many questions a flip budget needs: the smallest n such that ceil(expected*n) flips in n
    questions have a one-sided Clopper-Pearson upper bound <= --max-flips at --confidence (so a child
    flipping the expected rate passes `gate --confidence`); also from which n every larger n does."""
    from flipcheck.evaluation.confidence import plan_questions

    def go():
        p = plan_questions(parse_budget(max_flips, "--max-flips"), parse_budget(expected, "--expected"), confidence)
        console.print(f"{p.questions} questions: {p.flips} flips ({p.expected:.3%} expected) have a {p.confidence:.0%} "
                      f"upper bound of {p.bound:.3%} <= {p.budget:.3%}", highlight=False)
        if p.every_from > p.questions:
            console.print(f"every n >= {p.every_from} decides it too (checked to {p.checked_to}); some n between fail, "
                          "as ceil(expected*n) steps up", highlight=False)
        if confirm is not None:
            from flipcheck.decide.splits import split_plan

            for line in split_plan(p, confirm, candidates):
                console.print(line, highlight=False)

    run_guarded(go)
