"""``flipcheck judge`` and a recipe's ``judge:`` section: answer, grade, compare, summarise.

The order of work: the judge is asked once (preflight) before any model generates, unless every
answer and verdict the run needs is already cached (then the report is written from the cache and
the judge is never contacted, so a re-run works with the judge server stopped); the parent
answers once (cached, so K children cost K+1 generations); then per child: its answers, its
verdicts (the parent's single-answer ratings are shared by every child through the verdict
cache), and its ``judge`` section. Per-prompt rows (answers, scores, the judge's replies) go to
``judge.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.report import child_entry, new_report, write_report
from flipcheck.files import write_text_atomic
from flipcheck.judge.client import JudgeClient, JudgeSettings
from flipcheck.judge.generate import GenerationSettings, cached_answers, generate_answers
from flipcheck.judge.grading import (
    GRADER_VERSION,
    combine_orders,
    pair_prompt,
    parse_pair,
    parse_score,
    single_prompt,
)
from flipcheck.judge.prompts import PromptSet, load_prompts
from flipcheck.judge.stats import correlation, pair_summary, prompt_delta, single_summary, worst_prompts
from flipcheck.models import read_provenance, resolve_source

log = logging.getLogger(__name__)

MODES = ("single", "pairwise", "both")
JUDGE_ROWS = "judge.jsonl"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise FlipcheckError(f"--mode {mode!r}: allowed are {', '.join(MODES)}")
    return mode


@dataclass
class JudgeSession:
    """One judge, one prompt set, one parent: judges any number of children against that parent."""

    prompts: PromptSet
    settings: JudgeSettings
    gen: GenerationSettings
    mode: str = "both"
    cache_dir: str | Path | None = None
    use_cache: bool = True
    progress: Callable[[str], None] | None = None
    client: JudgeClient = field(init=False)
    parent: dict[str, list[str]] | None = field(default=None, init=False)
    rows: list[dict[str, Any]] = field(default_factory=list, init=False)
    wall: float = field(default=0.0, init=False)  # wall-clock seconds spent waiting for verdicts

    def __post_init__(self) -> None:
        check_mode(self.mode)
        self.client = JudgeClient(self.settings, cache_dir=self.cache_dir, use_cache=self.use_cache)

    def _say(self, msg: str) -> None:
        (self.progress or (lambda m: log.info("%s", m)))(msg)

    def preflight(self) -> None:
        """Check the judge (once per session; later calls send nothing)."""
        self.client.preflight()

    def fully_cached(self, parent: Any, children: Sequence[Any]) -> bool:
        """True when the parent's and every child's answers, and every verdict on them, are cached:
        the run needs neither a model nor the judge. Loads tokenizers (for the chat template in the
        answers' key), never a model, and asks the judge nothing."""
        kw = {"cache_dir": self.cache_dir, "use_cache": self.use_cache}
        pa = cached_answers(parent, self.prompts, self.gen, **kw)
        if pa is None:
            return False
        for child in children:
            ca = cached_answers(child, self.prompts, self.gen, **kw)
            if ca is None:
                return False
            _, items = self._plan(pa, ca)
            if not all(self.client.is_cached(k) for k, _, _ in items):
                return False
        return True

    def run_stats(self) -> dict[str, Any]:
        """This run's judge traffic: HTTP requests (retries included; 0 on a fully cached re-run) and time."""
        c = self.client
        return {"requests": c.requests, "answered": c.answered, "judge_seconds": round(c.seconds, 2),
                "wall_seconds": round(self.wall, 2),
                "seconds_per_verdict": round(self.wall / c.answered, 2) if c.answered else None}

    def answer(self, name: str, source: Any, *, model: Any = None, tokenizer: Any = None) -> dict[str, list[str]]:
        self._say(f"{name}: answering {len(self.prompts.prompts)} prompts")
        return generate_answers(source, self.prompts, self.gen, model=model, tokenizer=tokenizer,
                                cache_dir=self.cache_dir, use_cache=self.use_cache, before_work=self.preflight)

    def answer_parent(self, source: Any, *, model: Any = None, tokenizer: Any = None) -> None:
        self.parent = self.answer("parent", source, model=model, tokenizer=tokenizer)

    def judge_child(self, name: str, source: Any, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
        """The child's ``judge`` section (and its per-prompt rows in :attr:`rows`)."""
        if self.parent is None:
            raise FlipcheckError("judge: the parent has not answered yet (answer_parent first)")
        child = self.answer(name, source, model=model, tokenizer=tokenizer)
        records, items = self._plan(self.parent, child)
        if not all(self.client.is_cached(k) for k, _, _ in items):
            self.preflight()  # a verdict to ask: check the judge first (once)
        requests_before = self.client.requests
        self._say(f"{name}: judging ({len(items)} verdicts, {self.settings.concurrency} at a time)")
        t0 = time.perf_counter()
        verdicts = self.client.ask_many(items)
        self.wall += time.perf_counter() - t0
        self._fill(records, verdicts)
        section: dict[str, Any] = {
            "judge": self.settings.public(), "grader_version": GRADER_VERSION, "mode": self.mode,
            "prompts": {"source": self.prompts.source, "hash": self.prompts.content_hash, "n": len(self.prompts.prompts)},
            "max_new_tokens": self.gen.max_new_tokens,
            "verdicts": {"asked": len({k for k, _, _ in items}), "from_cache": sum(v.cached for v in verdicts.values()),
                         "requests": self.client.requests - requests_before},
        }
        if self.mode in ("single", "both"):
            section["single"] = single_summary(records)
        if self.mode in ("pairwise", "both"):
            section["pairwise"] = pair_summary(records)
        section["worst"] = [_worst_entry(r) for r in worst_prompts(records)]
        self.rows.extend({"child": name, **r} for r in records)
        return section

    # -- the verdicts a child needs ------------------------------------------------------------------

    def _plan(self, parent: dict[str, list[str]], child: dict[str, list[str]]):
        records, items = [], []
        for p in self.prompts.prompts:
            turns, ref = list(p.turns), list(p.reference) if p.reference else None
            pa, ca = parent[p.id], child[p.id]
            rec: dict[str, Any] = {"id": p.id, "category": p.category, "turns": turns, "parent_answers": pa,
                                   "child_answers": ca, "_keys": {}}
            if self.mode in ("single", "both"):
                for side, ans in (("parent", pa), ("child", ca)):
                    keys = []
                    for t in range(len(turns)):
                        text = single_prompt(turns, ans, t, ref)
                        k = self.client.key("single", text, GRADER_VERSION)
                        items.append((k, text, {"kind": "single", "prompt_id": p.id, "turn": t + 1}))
                        keys.append(k)
                    rec["_keys"][side] = keys
            if self.mode in ("pairwise", "both"):
                keys = []
                for a, b in ((pa, ca), (ca, pa)):  # parent first, then child first
                    text = pair_prompt(turns, a, b, ref)
                    k = self.client.key("pair", text, GRADER_VERSION)
                    items.append((k, text, {"kind": "pair", "prompt_id": p.id}))
                    keys.append(k)
                rec["_keys"]["pair"] = keys
            records.append(rec)
        return records, items

    def _fill(self, records: list[dict[str, Any]], verdicts: dict) -> None:
        for rec in records:
            keys = rec.pop("_keys")
            for side in ("parent", "child"):
                if side in keys:
                    vs = [verdicts[k] for k in keys[side]]
                    rec[f"{side}_scores"] = [parse_score(v.reply) for v in vs]
                    rec[f"{side}_replies"] = [v.reply for v in vs]
                    rec[f"{side}_errors"] = [v.error for v in vs]
            if "pair" in keys:
                vs = [verdicts[k] for k in keys["pair"]]
                raw = [parse_pair(v.reply) for v in vs]
                rec["pair_raw"] = raw
                rec["pair"] = combine_orders(raw[0], raw[1])
                rec["pair_replies"] = [v.reply for v in vs]
                rec["pair_errors"] = [v.error for v in vs]


def _worst_entry(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "category", "turns", "parent_answers", "child_answers", "parent_scores", "child_scores", "pair")
    out = {k: r.get(k) for k in keep}
    out["delta"] = prompt_delta(r)
    replies = r.get("child_replies") or []
    out["child_reason"] = (replies[-1] or "")[:600] if replies else None
    return out


def write_rows(out: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """judge.jsonl: one row per child and prompt (answers, scores, the judge's replies)."""
    write_text_atomic(Path(out) / JUDGE_ROWS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def judge_models(
    parent: str,
    children: Sequence[str],
    *,
    prompts: str,
    settings: JudgeSettings,
    gen: GenerationSettings,
    mode: str = "both",
    out: str | os.PathLike | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``flipcheck judge PARENT CHILD...``: a report whose children carry a ``judge`` section (no tasks)."""
    check_mode(mode)
    if not children:
        raise FlipcheckError("judge: name at least one child")
    ps = load_prompts(prompts, limit=limit)
    session = JudgeSession(ps, settings, gen, mode=mode, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    parent_src = resolve_source(parent)
    child_srcs = [resolve_source(c) for c in children]  # a missing child fails before any work
    if not session.fully_cached(parent_src, child_srcs):
        session.preflight()  # before any generation: a dead endpoint costs nothing
    session.answer_parent(parent_src)
    entries = []
    for spec, src in zip(children, child_srcs, strict=True):
        prov = (read_provenance(src.folder) if src.folder is not None else None) or {}
        entry = child_entry(spec, {}, source=src.ref, fingerprint=src.fingerprint, strength=prov.get("strength"),
                            method="+".join(s.get("method", "?") for s in prov.get("recipe") or []) or None)
        entry["judge"] = session.judge_child(spec, src)
        entries.append(entry)
    report = new_report({"source": parent_src.ref, "fingerprint": parent_src.fingerprint},
                        {"judge_prompts": ps.source, "max_new_tokens": gen.max_new_tokens, "judge_mode": mode}, entries)

    report["judge_correlation"] = correlation(report)
    report["judge_run"] = session.run_stats()
    if out is not None:
        write_report(out, report, [])
        write_rows(out, session.rows)
    return report


def recipe_session(recipe: Any, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                   progress: Callable[[str], None] | None = None) -> JudgeSession | None:
    """The judge of a recipe's ``judge:`` section (None when the recipe has none).

    Preflighted now, before any work, unless the parent's answers are all cached (a re-run): then
    the judge is checked only before the first answer or verdict that is not cached, so a re-run
    whose children and verdicts are all cached needs no judge. (The children of a recipe do not
    exist before it runs, so whether their answers are cached cannot be known up front.)
    """
    spec = getattr(recipe, "judge", None)
    if spec is None:
        return None
    gen = GenerationSettings(max_new_tokens=spec.max_new_tokens, device=recipe.device, dtype=recipe.dtype,
                             trust_remote_code=recipe.trust_remote_code)
    session = JudgeSession(load_prompts(spec.prompts, limit=spec.limit), spec.settings(), gen, mode=spec.mode,
                           cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    if recipe.parent == "demo" or cached_answers(recipe.parent, session.prompts, gen, cache_dir=cache_dir,
                                                 use_cache=use_cache) is None:
        session.preflight()
    return session


def finish_report(session: JudgeSession | None, report: dict[str, Any], out: str | os.PathLike) -> None:
    """Add the cross-child correlation and this run's judge traffic to `report`; write judge.jsonl."""
    if session is None:
        return

    report["judge_correlation"] = correlation(report)
    report["judge_run"] = session.run_stats()
    write_rows(out, session.rows)
