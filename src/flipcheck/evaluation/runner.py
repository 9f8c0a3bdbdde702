"""Evaluate children against their parent on identical lm-eval instances.

The flow for one child and one task:

1. the parent's results: from the cache (same parent identity and settings), or from a run of the
   parent alone (its own tokenizer and max length), then cached, so they never depend on a child.
2. the child's results, its vocabulary KL computed one way for every child of the report
   (``EvalSettings.kl``): ``topk`` against the parent's stored top-K log-probs and sampled tail
   tokens (K+1 passes for K children), or ``exact`` with the parent run in lock-step (2 per child).
3. join the two per-sample lists on doc_id and compute every figure (README, "What is measured"),
   per task as the user named it (an lm-eval group is one row, its subtasks beneath).

Each finished (child, task) pair is cached too, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import cache as cache_mod
from flipcheck.evaluation import generations
from flipcheck.evaluation.corpora import Corpora
from flipcheck.evaluation.floor import engine_floor, noise_floor
from flipcheck.evaluation.kl import kl_method
from flipcheck.evaluation.model_ref import ModelRef, _vocab_width, tokenizer_hash
from flipcheck.evaluation.records import Record, nonfinite_by_task
from flipcheck.evaluation.report.schema import child_entry, new_report
from flipcheck.evaluation.samples import aggregate, build_rows, set_headline, summarize_group, summarize_task
from flipcheck.evaluation.settings import EvalSettings, _task_config_hash, _unit_files
from flipcheck.evaluation.tasks import (
    check_filter,
    leaf_weights,
    resolve_tasks,
    task_manager,
    task_tree,
)

log = logging.getLogger(__name__)

# Version of what a child's cached records mean (2: each distinct scored position counted once, NaN/inf
# counts per record); part of every child key, so entries of an older engine are never reused.
ENGINE_VERSION = 4  # 3: records carry the reverse KL, KL(child || parent); 4: generations' finish and tf_miss


# Header fields lm-eval's simple_evaluate adds to its results after scoring; flipcheck reads only the
# samples and configs. add_env_info runs torch's collect_env (``pip list`` and other subprocesses,
# about a second per call on a CPU machine) and get_git_commit_hash runs ``git``.
_LM_EVAL_HEADER_HELPERS = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None}


@contextlib.contextmanager
def _without_lm_eval_env_info():
    """Within the block, lm-eval's simple_evaluate skips its environment/git header (restored after)."""
    from lm_eval import evaluator

    saved = {name: getattr(evaluator, name) for name in _LM_EVAL_HEADER_HELPERS if hasattr(evaluator, name)}
    try:
        for name in saved:
            setattr(evaluator, name, _LM_EVAL_HEADER_HELPERS[name])
        yield
    finally:
        for name, fn in saved.items():
            setattr(evaluator, name, fn)


def _lm_eval_samples(lm, unit: str, settings: EvalSettings) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Run lm-eval on one requested task (or group) with our LM; per-sample dicts by task name."""
    from lm_eval import evaluator

    with _without_lm_eval_env_info():
        res = evaluator.simple_evaluate(
            model=lm,
            tasks=[unit],
            num_fewshot=settings.num_fewshot,
            limit=None if settings.doc_ids else settings.limit,  # the split's ids already respect the limit
            samples=settings.doc_ids or None,
            task_manager=task_manager(settings.include_path, [unit]),
            log_samples=True,
            bootstrap_iters=0,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            verbosity="ERROR",
        )
    if res is None:
        raise FlipcheckError(f"lm-eval returned no results for task {unit!r}")
    kinds = {t: str(cfg.get("output_type", "")) for t, cfg in res.get("configs", {}).items()}
    return res["samples"], kinds


def _vocab_by_task(records: dict) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """Per task and document, the vocabulary KL, top-1 agreement and reverse KL of its scored positions."""
    per_doc: dict[tuple[str, int], list] = defaultdict(list)
    for (task, doc, _idx), rec in sorted(records.items()):
        if rec.kl is not None:
            per_doc[(task, doc)].append(rec)
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for (task, doc), recs in per_doc.items():
        kl = np.concatenate([np.asarray(r.kl, dtype=np.float64) for r in recs])
        agree = np.concatenate([np.asarray(r.top1_agree, dtype=bool) for r in recs])
        rev = (np.concatenate([np.asarray(r.kl_rev, dtype=np.float64) for r in recs])
               if all(r.kl_rev is not None for r in recs) else None)
        out[task][doc] = (kl, agree, rev)
    return out


class Evaluator:
    """Scores children against one parent, with the parent's results cached on disk."""

    def __init__(self, parent: ModelRef, settings: EvalSettings, cache: cache_mod.ResultCache | None = None):
        self.parent = parent
        self.settings = settings
        self.cache = cache or cache_mod.ResultCache()
        settings.resolve_batch_size(parent.resolved or parent.source or parent.torch_model)

        self.units = resolve_tasks(settings.tasks, settings.include_path) if settings.tasks or not settings.texts else []
        settings.tasks = self.units
        self._key_fields = settings.key_fields()
        self.trees = {u: task_tree(u, settings.include_path) for u in self.units}  # groups, to report as named
        rolling = _rolling_units(self.trees, settings.include_path)  # perplexity tasks: distance on their text
        self.units = [u for u in self.units if u not in rolling]
        self.trees = {u: t for u, t in self.trees.items() if u not in rolling}
        check_filter(list(self.trees.values()), settings.filter)
        self.corpora = Corpora(self, rolling, settings.texts)  # text corpora: distance token by token
        self._unit_keys: dict[str, dict[str, Any]] = {}
        self.on_step = None  # progress hook: called with "CHILD: tasks" / "CHILD: texts" as each step starts
        self.parent_passes = 0  # model passes of the parent made by this evaluator (for tests/benchmarks)

    # -- keys ---------------------------------------------------------------------------------
    def _unit_fields(self, unit: str) -> dict[str, Any]:
        if unit not in self._unit_keys:  # hashed once per evaluator, not per child
            self._unit_keys[unit] = {"unit": unit, "unit_files": _unit_files(unit),
                                     "task_config": _task_config_hash(unit, self.settings.include_path)}
        return self._unit_keys[unit]

    def parent_key(self, scope: dict[str, Any]) -> str:
        """The cache key of the parent's results on one scope (a task unit, or a text corpus): its
        identity (fingerprint, tokenizer, config, engine), the scoring settings and the scope's own fields.
        The one key path of question tasks and corpora."""
        self.parent.ensure_identity(self.settings)
        return cache_mod.entry_key(
            role="parent", model=self.parent.fingerprint, **self.parent.identity_key(), **scope,
            **self._key_fields, engine=ENGINE_VERSION,
        )

    def child_key(self, child: ModelRef, scope: dict[str, Any], method: str | None = None) -> str:
        """The cache key of a child's results on one scope, against this parent, its KL made by `method`."""
        return cache_mod.entry_key(
            role="child", model=child.fingerprint, **child.identity_key(), parent=self.parent.fingerprint,
            parent_identity=self.parent.identity_key(), **scope, **self._key_fields,
            kl=method or self.settings.kl, engine=ENGINE_VERSION,
        )

    def _parent_key(self, unit: str) -> str:
        return self.parent_key(self._unit_fields(unit))

    def _child_key(self, child: ModelRef, unit: str, method: str | None = None) -> str:
        return self.child_key(child, self._unit_fields(unit), method)

    # -- one child ----------------------------------------------------------------------------
    def check_child(self, child: ModelRef) -> None:
        """Before any scoring: the child's vocabulary must equal the parent's, and both sides get the
        same token ids (a GGUF child is encoded with the parent's tokenizer once the vocabularies match)."""
        self.parent.ensure_identity(self.settings)
        if child.served:  # the parent's token ids go to the server as they are; its distributions are V wide
            child.tokenizer = self.parent.tokenizer
            child.model.bind(self.parent.model.vocab if self.parent.served else _vocab_width(self.parent))
        child.ensure_identity(self.settings)
        if tokenizer_hash(child.tokenizer) != tokenizer_hash(self.parent.tokenizer):
            raise FlipcheckError(
                f"{child.name}: its tokenizer differs from the parent's; flips and KL need identical "
                "tokenizers and vocabularies (KL over different vocabularies is meaningless)"
            )
        gguf = (child.resolved is not None and child.resolved.gguf) or (
            self.parent.resolved is not None and self.parent.resolved.gguf)
        if gguf and child.tokenizer is not self.parent.tokenizer:
            child.tokenizer = self.parent.tokenizer


    def preflight(self, refs: list[ModelRef]) -> None:
        """Before any scoring: reach every served model that has something left to score (a cached
        re-run needs no server; a server that is down or returns no log-probs is one line, exit 2)."""
        if self.parent.served and any(not self.cache.has(self._parent_key(u)) for u in self.units):
            self.parent.model.connect()
        for ref in refs:
            if ref.served and any(not self.cache.has(self._child_key(ref, u)) for u in self.units):
                ref.model.connect()

    def evaluate_child(
        self, child: ModelRef, *, batch_size: int | None = None, kl: str | None = None
    ) -> tuple[dict, list[dict]]:
        """Per-task summaries and per-sample rows of one child against the parent; `kl` overrides the
        settings' vocabulary-KL method (the noise floor's is always ``topk``)."""
        self.check_child(child)
        summaries: dict[str, dict] = {}
        rows_by_task: dict[str, list] = {}
        all_rows: list[dict] = []
        unit_tasks: dict[str, list[str]] = {}  # the leaf tasks lm-eval ran for each named task or group
        method = kl or self.settings.kl
        kl_method(method, self.settings.topk)  # an unknown method fails before any model runs
        if self.on_step is not None and self.units:
            self.on_step(f"{child.name}: tasks")
        for unit in self.units:
            parent_samples, parent_records = self._parent_results(unit)
            child_samples, child_records = self._child_results(child, unit, parent_records, batch_size, method)
            nonfinite = {"parent": nonfinite_by_task(parent_records), "child": nonfinite_by_task(child_records)}
            unit_tasks[unit] = sorted(child_samples)
            vocab = _vocab_by_task(child_records)
            for task in sorted(child_samples):
                if task not in parent_samples:
                    raise FlipcheckError(f"{unit}: parent has no samples for subtask {task!r}; clear the cache")
                rows = build_rows(task, parent_samples[task], child_samples[task], vocab=vocab.get(task, {}),
                                  filter_name=self.settings.filter)
                generations.attach(rows, parent_records, child_records)
                set_headline(rows, self.settings.metric, task)
                bad = {who: counts.get(task, 0) for who, counts in nonfinite.items()}
                summary = summarize_task(rows, n_boot=self.settings.n_boot, seed=self.settings.seed, nonfinite=bad)
                if any(bad.values()):
                    log.warning("%s / %s: scored positions with NaN/inf logits: parent %d, child %d",
                                child.name, task, bad["parent"], bad["child"])
                summaries[task] = summary
                rows_by_task[task] = rows
                all_rows.extend({"child": child.name, **_row_dict(r)} for r in rows)
        summaries = self._named(summaries, rows_by_task, unit_tasks)
        agg = aggregate(summaries, rows_by_task, n_boot=self.settings.n_boot, seed=self.settings.seed) if summaries else {}
        entry = child_entry(
            child.name, summaries, micro=agg.get("micro"), macro=agg.get("macro"), source=child.source,
            fingerprint=child.fingerprint, method=child.info.get("method"), settings=child.info.get("settings"),
            strength=child.info.get("strength"), compression=child.info.get("compression", []),
            kl_method=kl_method(method, self.settings.topk),
        )
        entry["engine"] = child.engine_identity(self.settings)
        if entry["micro"] is not None:  # the pooled figures carry the counts too (the gate judges micro)
            entry["micro"]["nonfinite"] = _sum_nonfinite(s for n, s in summaries.items() if n != "micro")
        if self.corpora:
            if self.on_step is not None:
                self.on_step(f"{child.name}: texts")
            entry["corpus"] = self.corpora.figures(child, method, batch_size)
        return entry, all_rows

    def score_parent(self) -> None:
        """Score the parent on every task now (loading its weights only where its results are not
        cached), then let its weights go unless every child needs them in lock-step (kl exact)."""
        for unit in self.units:
            self._parent_results(unit)
        for name in self.corpora:
            if self.settings.kl != "exact":  # lock-step children need no stored parent side
                self.corpora.score_parent(name)
        if self.settings.kl != "exact":
            self.parent.release()

    def missing_parent_units(self) -> list[str]:
        """Units whose parent results are not in the cache (an evaluation shard or Ray worker needs
        every one there: it reads the parent, it never scores it)."""
        self.parent.ensure_identity(self.settings)
        return [u for u in self.units if self.cache.get(self._parent_key(u), _record_cls()) is None]

    def score_child(self, child: ModelRef) -> None:
        """Score `child` on every unit into the cache, without summaries: an evaluation shard's work,
        merged later by :meth:`evaluate_child` reading the same entries."""
        self.parent.ensure_identity(self.settings)
        child.ensure_identity(self.settings)
        for unit in self.units:
            _, parent_records = self._parent_results(unit)
            self._child_results(child, unit, parent_records, None, self.settings.kl)

    def _parent_results(self, unit: str) -> tuple[dict, dict]:
        """The parent's samples and records of one unit: from the cache, or from a run of the parent
        alone (its own tokenizer, max length and batch size), so they never depend on a child."""
        from flipcheck.evaluation.lm import FlipLM

        self.parent.ensure_identity(self.settings)  # the key needs the fingerprint and tokenizer, even on a first call
        pkey = self._parent_key(unit)
        hit = self.cache.get(pkey, Record)
        if hit is not None:
            return hit
        self.parent.ensure_loaded(self.settings)
        lm = FlipLM(
            self.parent.model, self.parent.tokenizer, batch_size=self.settings.batch_size, topk=self.settings.topk,
            sampling=self.settings.sampling_spec(),
        )
        samples, _ = _lm_eval_samples(lm, unit, self.settings)
        self.parent_passes += 1
        self.cache.put(pkey, samples, lm.records, {"unit": unit, "parent": self.parent.source})
        return samples, lm.records

    def _child_results(self, child: ModelRef, unit: str, parent_records: dict, batch_size: int | None,
                       method: str) -> tuple[dict, dict]:
        """The child's samples and records of one unit, its KL computed by `method` (cached per method):
        ``topk`` against the parent's stored top-K, ``exact`` with the parent run in lock-step."""
        from flipcheck.evaluation.lm import FlipLM

        ckey = self._child_key(child, unit, method)
        hit = self.cache.get(ckey, Record)
        if hit is not None:
            log.info("%s / %s: finished in an earlier run (cache)", child.name, unit)
            return hit
        child.ensure_loaded(self.settings)
        reference: Any = parent_records
        if method == "exact":
            self.parent.ensure_loaded(self.settings)
            reference = self.parent.model
            self.parent_passes += 1
        lm = FlipLM(
            child.model, child.tokenizer, batch_size=batch_size or self.settings.batch_size,
            reference=reference, topk=self.settings.topk,
            reference_tokenizer=self.parent.tokenizer if method == "exact" else None, ref_tail=method != "bound",
            sampling=self.settings.sampling_spec(),
        )
        samples, _ = _lm_eval_samples(lm, unit, self.settings)
        self.cache.put(ckey, samples, lm.records, {"unit": unit, "child": child.source, "kl": method})
        return samples, lm.records

    def _named(self, summaries: dict[str, dict], rows_by_task: dict[str, list], unit_tasks: dict[str, list[str]]) -> dict:
        """The rows as the user named them: a group is one row (its subtasks beneath), unless --per-subtask."""
        if self.settings.per_subtask:
            return summaries
        return named_summaries(
            self.trees, unit_tasks, summaries, rows_by_task, n_boot=self.settings.n_boot, seed=self.settings.seed
        )

    def noise_floor(self, numerics: bool = True) -> list[dict]:
        """The parent against itself under changes that are not compression (:mod:`~flipcheck.evaluation.floor`):
        the numerics rows (`numerics`) and, with ``settings.engine_floor``, the other-engine row."""
        rows = noise_floor(self) if numerics else []
        if self.settings.engine_floor:
            rows.extend(engine_floor(self))
        return rows

    def report(self, children_entries: list[dict], noise_floor: list[dict] | None = None) -> dict:
        method = kl_method(self.settings.kl, self.settings.topk)
        for e in children_entries:  # one kind of vocabulary KL per report
            if e.get("kl_method", method) != method:
                raise FlipcheckError(
                    f"{e.get('name')}: its vocabulary KL is {e['kl_method'].get('label')}, the report's "
                    f"{method['label']}; re-evaluate it with kl={self.settings.kl!r}"
                )
        parent = {"source": self.parent.source, "fingerprint": self.parent.fingerprint,
                  "engine": self.parent.engine_identity(self.settings)}
        if self.parent.resolved is not None and self.parent.resolved.revision:
            parent["revision"] = self.parent.resolved.revision  # a hub parent: the commit that was scored
        return new_report(
            parent, self.settings.public(),
            children_entries, noise_floor, kl_method=method,
        )


def _record_cls() -> type:
    return Record


def named_summaries(
    trees: dict[str, Any],
    unit_tasks: dict[str, list[str]],
    summaries: dict[str, dict],
    rows_by_task: dict[str, list],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """One summary per name the user gave: an lm-eval group becomes one row aggregated as lm-eval
    aggregates it (see samples.summarize_group), with its subtasks under ``subtasks``; a task is
    its own row, and a tag (a list of tasks, not a group) gives each of its tasks a row."""
    out: dict[str, dict] = {}
    for unit, tasks in unit_tasks.items():
        tree = trees.get(unit)
        if tree is None or tree.kind != "group" or tasks == [unit]:
            out.update({t: summaries[t] for t in tasks})
            continue
        leaf_rows = {t: rows_by_task[t] for t in tasks}
        weights = leaf_weights(tree, {t: len(r) for t, r in leaf_rows.items()})
        group = summarize_group(unit, leaf_rows, {t: summaries[t] for t in tasks}, weights, n_boot=n_boot, seed=seed)
        group["nonfinite"] = _sum_nonfinite(summaries[t] for t in tasks)
        out[unit] = group
    return out


def _rolling_units(trees: dict[str, Any], include_path) -> list[str]:
    """The named tasks that are perplexity tasks (lm-eval's ``loglikelihood_rolling``): they have no
    answers to flip, so their documents are scored as a corpus. A group mixing them with question
    tasks is refused before any model runs."""
    rolling = []
    for unit, tree in trees.items():
        index = task_manager(include_path, [unit]).task_index
        kinds = {}
        for leaf in tree.leaves():
            cfg = getattr(index.get(leaf.name), "cfg", None) or {}
            kinds[leaf.name] = isinstance(cfg, dict) and cfg.get("output_type") == "loglikelihood_rolling"
        if all(kinds.values()) and kinds:
            rolling.append(unit)
        elif any(kinds.values()):
            bad = sorted(n for n, r in kinds.items() if r)
            raise FlipcheckError(
                f"group {unit!r} mixes perplexity tasks ({', '.join(bad)}) with question tasks; name them separately "
                "(perplexity tasks are scored as text corpora)"
            )
    return rolling


def _sum_nonfinite(summaries) -> dict[str, int]:
    """Parent's and child's NaN/inf scored positions summed over task summaries."""
    out = {"parent": 0, "child": 0}
    for s in summaries:
        for who, n in (s.get("nonfinite") or {}).items():
            if who in out:
                out[who] += int(n or 0)
    return out


def _row_dict(row) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(row) if is_dataclass(row) else dict(row)


