"""``flipcheck eval`` as a function: one or more children against their parent on lm-eval tasks
(and text corpora), children run by an executor, the report written where asked."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.cache import ResultCache
from flipcheck.evaluation.kl import DEFAULT_TOPK
from flipcheck.evaluation.model_ref import ModelRef, child_ref, parent_source_for, served_ref
from flipcheck.evaluation.options import EvalOptions
from flipcheck.evaluation.report import write_report
from flipcheck.evaluation.runner import Evaluator
from flipcheck.evaluation.settings import EvalSettings
from flipcheck.executors import finish_report, get_executor
from flipcheck.models import resolve_source
from flipcheck.orchestrate.children import evaluate_children

log = logging.getLogger(__name__)


def served_kl(kl: str, served, texts) -> str:
    """The vocabulary-KL method of an evaluation with served children (`served`: (url, model) pairs):
    a server returns its top-K only, so every child of the report gets the top-K + tail-bucket bound."""
    if not served:
        return kl
    if kl == "exact":
        raise FlipcheckError("--kl exact runs the parent in lock-step with each child, which a served model "
                             "cannot do; allowed with a served child: topk, bound")
    if texts:
        raise FlipcheckError("--text with a served child is not supported yet; score text with the model in "
                             "process (--engine vllm or transformers)")
    if kl == "topk":
        log.info("a served child returns its top-K log-probs only: every child's vocabulary KL is the "
                 "top-K + tail-bucket lower bound (kl=bound)")
    return "bound"


def evaluate(
    parent: str | None,
    child: str | list[str],
    *,
    tasks: str | list[str],
    out: str | os.PathLike | None = None,
    options: EvalOptions | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    topk: int = DEFAULT_TOPK,
    executor: Any = None,
    served: list[tuple[str, str]] | None = None,
    served_parent: tuple[str, str] | None = None,
    on_step: Any = None,
    doc_ids: dict[str, list[int]] | None = None,
    **chosen: Any,
) -> dict:
    """Compare one or more children with their parent on lm-eval tasks; returns the report dict.

    How they are scored is `options` (:class:`~flipcheck.evaluation.options.EvalOptions`), or its fields
    given by name (``evaluate(p, c, tasks="arc_easy", kl="exact", limit=200)``), which override `options`;
    an unknown or bad one fails in one line before any model loads. `parent` may be None when each
    child's flipcheck.json names it. With `out`, writes report.json, samples.jsonl, report.md and
    report.html there. `served`: (URL, model name) of children already served behind an
    OpenAI-compatible /v1/completions; `served_parent`: the parent's (`parent` then gives the
    tokenizer). A report with a served model has the bound as its KL method. `doc_ids`: only these doc
    ids per leaf task (lm-eval's ``samples=``, as search's splits use it). `topk`: the parent's top-K
    log-probs kept per scored position (the topk and bound KL read them).
    """
    opts = EvalOptions.merged(options, chosen)
    parent_src, child_sources = _sources(parent, child, served)
    kl = served_kl(opts.kl, list(served or []) + ([served_parent] if served_parent else []), opts.texts)
    if served_parent and (opts.noise_floor or opts.engine_floor):
        raise FlipcheckError("--noise-floor and --engine-floor run the parent's weights here; a served parent has none")
    settings = EvalSettings(**{**opts.model_dump(), "kl": kl}, topk=topk, doc_ids=doc_ids,
                            tasks=tasks if isinstance(tasks, list) else [t for t in tasks.split(",") if t.strip()])
    parent_ref = (ModelRef("parent", parent_src, engine=settings.engine_of("parent")) if not served_parent
                  else served_ref(*served_parent, settings, tokenizer_from=parent_src))
    ev = Evaluator(parent_ref, settings, ResultCache(cache_dir, enabled=use_cache))
    ev.on_step = on_step  # progress: "CHILD: tasks", "CHILD: texts" (the CLI draws them)
    refs = _child_refs(ev, settings, child_sources, served)
    done = evaluate_children(get_executor(executor), ev, refs, Path(out) if out is not None else None,
                             lambda msg: log.info("%s", msg))
    floor = ev.noise_floor(numerics=opts.noise_floor) if opts.noise_floor or opts.engine_floor else None
    report = finish_report(ev.report(done.entries, floor), done.failed, done.info)
    if out is not None:
        write_report(out, report, done.rows)
    return report


def _sources(parent: str | None, child: str | list[str], served: list[tuple[str, str]] | None):
    """(parent source, child sources), each resolved; the parent read from the first child's
    flipcheck.json when not named. Refuses no child at all, and a served child alone with no parent."""
    children = [child] if isinstance(child, str) else list(child or [])
    if not children and not served:
        raise FlipcheckError("no child model given")
    child_sources = [resolve_source(c) for c in children]  # a missing path or hub id fails before any loading
    if parent is None and not child_sources:
        raise FlipcheckError("a served child needs the parent named (its flipcheck.json is not here to read)")
    parent_src = resolve_source(parent or parent_source_for(child_sources[0]))
    return parent_src, child_sources


def _child_refs(ev: Evaluator, settings: EvalSettings, child_sources: list, served: list[tuple[str, str]] | None) -> list:
    """The children's model references (local, then served), each checked against the parent and
    preflighted before the parent or any child is scored."""
    refs = [child_ref(c, engine=settings.engine_of("child")) for c in child_sources]
    refs += [served_ref(url, name, settings) for url, name in served or []]
    for ref in refs:  # vocabularies and engines checked before the parent or any child is scored
        ev.check_child(ref)
    ev.preflight(refs)
    return refs
