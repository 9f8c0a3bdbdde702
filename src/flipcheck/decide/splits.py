"""A search split and a confirmation split of the questions, and the budgets each split can decide.

A search that proposes and verifies many children on one set of questions and keeps the smallest
that passes picks, among the children near the border, the one those questions favoured (the
winner's curse: README, "Held out, by hand"). `flipcheck search` therefore divides the questions
it is given in two:

- **Stratified, seeded split.** Within every leaf task (an lm-eval task; the subjects of a group such
  as ``mmlu`` are leaves, so the split is stratified by task and subtask) the question ids are
  shuffled by a generator seeded with (seed, SHA-256 of the task name), and the first
  ``m = round(fraction · n)`` (clamped to 1 … n − 1) go to the confirmation split, the others to the
  search split. The same seed gives the same split whatever the order of the tasks; each task's
  share of each split is its share of the questions.
- **The question ids** are lm-eval's doc ids (the position of a question in the task's evaluation
  documents, after ``--limit``); a run is restricted to them with lm-eval's own
  ``simple_evaluate(samples={task: [ids]})``. lm-eval 0.4.13 numbers the samples of such a run
  0 … k − 1 in the order of the task's documents; :meth:`Split.original` maps them back.
- **Search budgets, tightened (Bonferroni).** With ``--confidence c`` the release gate allows a child
  whose true flip rate is over budget to pass with probability at most 1 − c. The search looks at up
  to K = ``--max-candidates`` children and keeps the smallest that passes, so its chance of letting
  *some* over-budget child through on the search split is up to K (1 − c). Judging the search split
  at c_s = 1 − (1 − c) / K bounds that family-wise error by 1 − c (Bonferroni's inequality:
  P(∪ A_k) ≤ Σ P(A_k)), whatever the dependence between candidates, and K is fixed before any child
  is seen. The confirmation split is judged once per confirmed candidate at c itself, as the release
  gate would; confirming the next candidate after a failure is a further look, which the report
  counts (``confirmed`` lists every candidate judged there). Without ``--confidence`` budgets are
  point estimates and nothing is tightened.
- **Too small to decide.** A split decides a flip budget B at confidence c only if a child with no
  flip at all passes: the one-sided Clopper–Pearson bound of 0 flips in n, 1 − (1 − c)^(1/n), must be
  <= B, i.e. n >= ln(1 − c) / ln(1 − B); likewise Δacc's lower bound with no change, −z²/(n + z²),
  must be >= the Δacc budget. Checked per task as the gate judges them, before any model loads.
- **The probe reads the search split only.** Without ``--calibration`` the sensitivities (and the
  compressors that calibrate) read the prompts of the evaluated tasks (``prompts:TASKS``), which would
  include the confirmation questions. A split search instead writes the ``doc_to_text`` of its search
  split's questions (never an answer) to ``DIR/search-split-prompts-H.jsonl``, H the SHA-256 of its
  content, and reads that: the file's name and content key the sensitivities and every child's
  ``made_with``, so another split (seed, share, ``--limit``) never reuses what this one measured.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.tasks import task_manager
from flipcheck.files import write_text_atomic
from flipcheck.gate import parse_budget

DEFAULT_CONFIRM = 0.3


def parse_confirm(value: str | float | None) -> float | None:
    """The confirmation fraction: strictly between 0 and 1 ('0.3' or '30%'); None means no split."""
    if value is None:
        return None
    s = str(value).strip()
    try:
        f = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        f = math.nan
    if not (0.0 < f < 1.0):
        raise FlipcheckError(f"--confirm {value!r}: the share of the questions held out for confirmation, "
                             "strictly between 0 and 1 (e.g. 0.3 or 30%)")
    return f


def search_confidence(confidence: float | None, candidates: int) -> float | None:
    """Bonferroni: the search split is judged at 1 − (1 − c) / K for K candidates (module docstring)."""
    if confidence is None:
        return None
    return 1.0 - (1.0 - confidence) / max(1, int(candidates))


def question_counts(units: Sequence[str], include_path=None, limit: float | None = None) -> dict[str, dict[str, int]]:
    """Per named task, per leaf task: how many questions lm-eval scores (its evaluation documents,
    cut by ``limit`` as lm-eval cuts them: a count, or ceil(fraction · n)). Loads the task data (no model)."""
    out: dict[str, dict[str, int]] = {}
    for unit in units:
        loaded = task_manager(include_path, [unit]).load([unit])
        leaves: dict[str, int] = {}
        for name, task in sorted(loaded["tasks"].items()):
            n = len(task.eval_docs)
            if limit is not None:
                n = min(n, int(math.ceil(n * limit)) if limit < 1.0 else int(limit))
            leaves[str(name)] = n
        out[unit] = leaves
    return out


def _rng(seed: int, task: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, digest])


@dataclass
class Split:
    """Question ids per leaf task of the two splits (sorted), and the named tasks they belong to."""

    search: dict[str, list[int]]
    confirm: dict[str, list[int]]
    units: dict[str, list[str]]  # named task -> its leaf tasks
    fraction: float
    seed: int

    def sizes(self, which: str) -> dict[str, int]:
        """Questions per named task in the search or confirm split."""
        ids = self.search if which == "search" else self.confirm
        return {u: sum(len(ids[leaf]) for leaf in leaves) for u, leaves in self.units.items()}

    def original(self, which: str, task: str, doc_id: int) -> int:
        """The task's own doc id of the `doc_id`-th question of a run restricted to this split."""
        return (self.search if which == "search" else self.confirm)[task][int(doc_id)]

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "units": self.units,
                "search": self.search, "confirm": self.confirm,
                "sizes": {"search": self.sizes("search"), "confirm": self.sizes("confirm")}}


def split_questions(counts: Mapping[str, Mapping[str, int]], fraction: float, seed: int) -> Split:
    """The stratified, seeded split of the module docstring; every leaf needs at least 2 questions."""
    fraction = parse_confirm(fraction)
    search: dict[str, list[int]] = {}
    confirm: dict[str, list[int]] = {}
    for unit, leaves in counts.items():
        for task, n in leaves.items():
            if n < 2:
                raise FlipcheckError(f"--confirm: task {task!r} (in {unit}) has {n} question(s); each task needs at least 2 "
                                     "to have one in each split (give more questions, or --confirm-tasks)")
            order = _rng(seed, task).permutation(n)
            m = min(n - 1, max(1, int(round(fraction * n))))
            confirm[task] = sorted(int(i) for i in order[:m])
            search[task] = sorted(int(i) for i in order[m:])
    return Split(search, confirm, {u: list(leaves) for u, leaves in counts.items()}, fraction, int(seed))


def search_prompts(split: Split, include_path=None) -> list[str]:
    """The prompts (``doc_to_text``, never the target) of the search split's questions only, per leaf task
    in doc-id order, at most ``PROMPTS_PER_TASK`` a leaf as the ``prompts:`` source reads them."""
    from flipcheck.compressors.calibration_data import PROMPTS_PER_TASK

    texts: list[str] = []
    for unit, leaves in split.units.items():
        loaded = {str(k): t for k, t in task_manager(include_path, [unit]).load([unit])["tasks"].items()}
        for leaf in leaves:
            task = loaded[leaf]
            docs = task.eval_docs
            for i in split.search[leaf][:PROMPTS_PER_TASK]:
                text = task.doc_to_text(docs[i])
                if isinstance(text, str) and text.strip():
                    texts.append(text)
    return texts


def search_split_text(calibration: dict[str, Any], note: str | None, split: Split | None, include_path,
                      folder: str | Path) -> tuple[dict[str, Any], str | None]:
    """(calibration, note) with the default ``prompts:`` text replaced by the search split's prompts,
    written to `folder` (module docstring); unchanged where the text was given or nothing is split."""
    from flipcheck.compressors.calibration_data import PROMPTS

    if split is None or note is None or not str(calibration.get("source") or "").startswith(PROMPTS):
        return calibration, note
    texts = search_prompts(split, include_path)
    if not texts:
        raise FlipcheckError("search: the search split's questions have no text prompts; pass --calibration")
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    name = f"search-split-prompts-{hashlib.sha256(data.encode()).hexdigest()[:16]}.jsonl"
    path = Path(folder).expanduser().resolve() / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, data)
    return ({**calibration, "source": str(path)},
            f"{note}; search split only ({len(texts)} prompts, no confirmation question)")


def min_questions(budgets: Mapping[str, Any], confidence: float | None) -> int:
    """The fewest questions per task on which a child with no flip and no accuracy change passes the
    flip and Δacc budgets at `confidence` (1 without a confidence: point estimates need one question)."""
    from scipy import stats


    if confidence is None:
        return 1
    need = 1
    flips = budgets.get("max_flips")
    if flips is not None:
        b = parse_budget(flips, "--max-flips")
        if b <= 0:
            return math.inf  # type: ignore[return-value]  # no n bounds flips at 0
        if b < 1:
            need = max(need, math.ceil(math.log(1 - confidence) / math.log(1 - b) - 1e-9))
    delta = budgets.get("min_acc_delta")
    if delta is not None:
        d = parse_budget(delta, "--min-acc-delta")
        if d >= 0:
            return math.inf  # type: ignore[return-value]  # the bound with no change is below 0
        z2 = float(stats.norm.ppf(confidence)) ** 2
        need = max(need, math.ceil(z2 / -d - z2 - 1e-9))  # −z²/(n + z²) >= d
    return need


def check_decidable(sizes: Mapping[str, int], budgets: Mapping[str, Any], confidence: float | None, label: str) -> None:
    """Refuse a split whose smallest task cannot decide the budgets (module docstring)."""
    need = min_questions(budgets, confidence)
    small = {u: n for u, n in sizes.items() if n < need}
    if small:
        u, n = min(small.items(), key=lambda kv: kv[1])
        conf = f" at confidence {confidence:.4g}" if confidence is not None else ""
        got = "no number of questions" if math.isinf(need) else f"at least {need} per task"
        raise FlipcheckError(f"--confirm: the {label} split holds {n} question(s) of {u}; deciding the budgets{conf} needs "
                             f"{got} (a child with no flip could not pass); give more questions or a larger share")


def split_plan(plan, confirm: str | float, candidates: int) -> list[str]:
    """`plan --confirm`: the questions each split needs per task to decide the budget for a child at the
    expected rate (the search split at the Bonferroni-tightened confidence), and the total that gives both."""
    from flipcheck.evaluation.confidence import plan_questions

    fraction = parse_confirm(confirm)
    c_s = search_confidence(plan.confidence, candidates)
    search = plan_questions(plan.budget, plan.expected, c_s).questions
    conf = plan.questions
    total = max(math.ceil(search / (1 - fraction) - 1e-9), math.ceil(conf / fraction - 1e-9))
    return [f"search split: {search} questions (judged at {c_s:.4%} confidence: 1 - (1 - c)/{candidates} candidates)",
            f"confirmation split: {conf} questions (judged at {plan.confidence:.0%})",
            f"with --confirm {fraction:g}: {total} questions per task in all"]
