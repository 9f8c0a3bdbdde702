"""Evaluate children against their parent on identical lm-eval instances.

The flow for one child and one task:

1. parent results cached (same parent fingerprint and settings)? Score only the child, with KL over
   the vocabulary taken against the parent's stored top-K distributions.
2. otherwise run parent and child in lock-step on the same batches (exact KL over the whole
   vocabulary), replay the parent's recorded answers through lm-eval to get its per-sample
   metrics without a second forward, and cache the parent's results for the next child.
3. join the two per-sample lists on doc_id and compute every figure of SPEC section 2.

Each finished (child, task) pair is cached too, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck import __version__
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import cache as cache_mod
from flipcheck.evaluation.tasks import _include_paths, resolve_tasks, task_manager
from flipcheck.models import (
    check_source,
    fingerprint,
    load_model,
    load_tokenizer,
    read_provenance,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """Everything that decides which instances are scored and how."""

    tasks: list[str]
    include_path: str | list[str] | None = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    seed: int = 1234
    batch_size: int = 16
    topk: int = 64  # parent top-K log-probs kept per scored position for KL against a cached parent
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise FlipcheckError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise FlipcheckError(f"limit must be > 0 (a count, or a fraction in (0, 1]), got {self.limit}")
        if self.batch_size < 1:
            raise FlipcheckError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.topk < 1:
            raise FlipcheckError(f"topk must be >= 1, got {self.topk}")

    def key_fields(self) -> dict[str, Any]:
        import lm_eval

        dev = resolve_device(self.device)
        return {
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "seed": self.seed,
            "topk": self.topk,
            "dtype": str(resolve_dtype(self.dtype, dev)),
            "lm_eval": getattr(lm_eval, "__version__", "?"),
            # content of the user's local task folders (a private task edited -> new results)
            "task_files": cache_mod.folder_content_hash(_user_include_paths(self.include_path)),
        }

    def public(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "include_path": self.include_path,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "topk": self.topk,
            "device": resolve_device(self.device),
            "dtype": str(resolve_dtype(self.dtype, resolve_device(self.device))).replace("torch.", ""),
        }


def _user_include_paths(include_path) -> tuple[str, ...]:
    from flipcheck.demo import demo_task_dir

    demo = str(demo_task_dir())
    return tuple(p for p in _include_paths(include_path) if p != demo)


def _unit_files(unit: str) -> str | None:
    """The packaged demo tasks' content enters only the keys of demo task units."""
    from flipcheck.demo import demo_task_dir

    if not unit.startswith("flipcheck_demo"):
        return None
    return cache_mod.folder_content_hash((str(demo_task_dir()),))


@dataclass
class ModelRef:
    """A model to evaluate: where it comes from, and (lazily) the loaded weights."""

    name: str
    source: str | None
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # method, settings, strength, compression reports

    def ensure_identity(self, settings: EvalSettings) -> None:
        """Tokenizer and fingerprint, without loading the weights when flipcheck.json has them."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.source, trust_remote_code=settings.trust_remote_code)
        if self.fingerprint is None:
            self.fingerprint = cached_fingerprint(self.source, self.model)

    def ensure_loaded(self, settings: EvalSettings) -> None:
        if self.model is None:
            if self.source is None:
                raise FlipcheckError(f"model {self.name!r} has neither weights nor a source")
            log.info("loading %s", self.source)
            self.model = load_model(
                self.source, device=settings.device, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code
            )
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.source, trust_remote_code=settings.trust_remote_code)
        if self.fingerprint is None:
            self.fingerprint = cached_fingerprint(self.source, self.model)

    def release(self) -> None:
        """Drop the weights (a sweep keeps one child in memory at a time)."""
        if self.source is not None:
            self.model = None


def _stat_key(source: str) -> str | None:
    p = Path(source)
    if not p.is_dir():
        return None
    files = sorted(p.glob("*.safetensors"))
    if not files:
        return None
    parts = [str(p.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def cached_fingerprint(source: str | None, model: torch.nn.Module | None) -> str:
    """A model's fingerprint: from its flipcheck.json, a memo keyed by file stats, or the weights."""
    if source is not None and os.path.isdir(source):
        prov = read_provenance(source)
        if prov and prov.get("fingerprint") and not prov.get("loader"):
            # flipcheck wrote it from the in-memory weights it saved
            return prov["fingerprint"]
        key = _stat_key(source)
        memo = cache_mod.default_cache_dir() / "fingerprints" / f"{key}.txt" if key else None
        if memo is not None and memo.is_file():
            return memo.read_text().strip()
        if model is None:
            model = load_model(source, device="cpu", dtype="float32")
        fp = fingerprint(model)
        if memo is not None:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(fp)
            os.replace(tmp, memo)
        return fp
    if model is None:
        raise FlipcheckError(f"cannot fingerprint {source!r}: no weights")
    return fingerprint(model)


def tokenizer_hash(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


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
            limit=settings.limit,
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


def _vocab_by_doc(records: dict, task: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    per_doc: dict[int, list] = defaultdict(list)
    for (t, doc, _idx), rec in sorted(records.items()):
        if t == task and rec.kl is not None:
            per_doc[doc].append(rec)
    out = {}
    for doc, recs in per_doc.items():
        kl = np.concatenate([np.asarray(r.kl, dtype=np.float64) for r in recs])
        agree = np.concatenate([np.asarray(r.top1_agree, dtype=bool) for r in recs])
        out[doc] = (kl, agree)
    return out


class Evaluator:
    """Scores children against one parent, with the parent's results cached on disk."""

    def __init__(self, parent: ModelRef, settings: EvalSettings, cache: cache_mod.ResultCache | None = None):
        self.parent = parent
        self.settings = settings
        self.cache = cache or cache_mod.ResultCache()
        self.units = resolve_tasks(settings.tasks, settings.include_path)
        settings.tasks = self.units
        self._key_fields = settings.key_fields()
        self.parent_passes = 0  # model passes of the parent made by this evaluator (for tests/benchmarks)

    # -- keys ---------------------------------------------------------------------------------
    def _parent_key(self, unit: str) -> str:
        return cache_mod.entry_key(
            role="parent", model=self.parent.fingerprint, unit=unit, unit_files=_unit_files(unit), **self._key_fields
        )

    def _child_key(self, child: ModelRef, unit: str) -> str:
        return cache_mod.entry_key(
            role="child", model=child.fingerprint, parent=self.parent.fingerprint, unit=unit,
            unit_files=_unit_files(unit), **self._key_fields,
        )

    # -- one child ----------------------------------------------------------------------------
    def evaluate_child(self, child: ModelRef, *, batch_size: int | None = None) -> tuple[dict, list[dict]]:
        """Per-task summaries and per-sample rows of one child against the parent."""
        from flipcheck.evaluation.lm import FlipLM, Record, ReplayLM
        from flipcheck.evaluation.samples import aggregate, build_rows, summarize_task

        self.parent.ensure_identity(self.settings)
        child.ensure_identity(self.settings)
        if tokenizer_hash(child.tokenizer) != tokenizer_hash(self.parent.tokenizer):
            raise FlipcheckError(
                f"{child.name}: its tokenizer differs from the parent's; flips and KL need identical "
                "tokenizers and vocabularies (KL over different vocabularies is meaningless)"
            )
        summaries: dict[str, dict] = {}
        rows_by_task: dict[str, list] = {}
        all_rows: list[dict] = []
        for unit in self.units:
            ckey = self._child_key(child, unit)
            hit = self.cache.get(ckey, Record)
            pkey = self._parent_key(unit)
            parent_hit = self.cache.get(pkey, Record)
            if hit is not None and parent_hit is not None:
                log.info("%s / %s: finished in an earlier run (cache)", child.name, unit)
                child_samples, child_records = hit
                parent_samples, _ = parent_hit
                nonfinite: dict[str, int] = {}
            else:
                child.ensure_loaded(self.settings)
                if parent_hit is not None:
                    parent_samples, parent_records = parent_hit
                    lm = FlipLM(
                        child.model, child.tokenizer, batch_size=batch_size or self.settings.batch_size,
                        reference=parent_records, topk=self.settings.topk,
                    )
                    child_samples, _ = _lm_eval_samples(lm, unit, self.settings)
                else:
                    self.parent.ensure_loaded(self.settings)
                    lm = FlipLM(
                        child.model, child.tokenizer, batch_size=batch_size or self.settings.batch_size,
                        reference=self.parent.model, topk=self.settings.topk,
                        reference_tokenizer=self.parent.tokenizer,
                    )
                    child_samples, _ = _lm_eval_samples(lm, unit, self.settings)
                    self.parent_passes += 1
                    parent_records = lm.reference_records
                    parent_samples, _ = _lm_eval_samples(ReplayLM(parent_records), unit, self.settings)
                    self.cache.put(pkey, parent_samples, parent_records, {"unit": unit, "parent": self.parent.source})
                child_records = lm.records
                nonfinite = dict(lm.nonfinite)
                self.cache.put(ckey, child_samples, child_records, {"unit": unit, "child": child.source})
            for task in sorted(child_samples):
                if task not in parent_samples:
                    raise FlipcheckError(f"{unit}: parent has no samples for subtask {task!r}; clear the cache")
                rows = build_rows(task, parent_samples[task], child_samples[task], vocab=_vocab_by_doc(child_records, task))
                summary = summarize_task(rows, n_boot=self.settings.n_boot, seed=self.settings.seed)
                if nonfinite.get(task):
                    summary["nonfinite_positions"] = nonfinite[task]
                    log.warning("%s / %s: %d scored positions had NaN/inf logits", child.name, task, nonfinite[task])
                summaries[task] = summary
                rows_by_task[task] = rows
                all_rows.extend({"child": child.name, **_row_dict(r)} for r in rows)
        agg = aggregate(summaries, rows_by_task)
        entry = {
            "name": child.name,
            "source": child.source,
            "fingerprint": child.fingerprint,
            "method": child.info.get("method"),
            "settings": child.info.get("settings"),
            "strength": child.info.get("strength"),
            "compression": child.info.get("compression", []),
            "tasks": summaries,
            "micro": agg.get("micro"),
            "macro": agg.get("macro"),
        }
        return entry, all_rows

    def noise_floor(self) -> dict:
        """The parent against itself re-run with another batch size: what numerics alone change.

        Scored against the parent's cached results, so KL comes from the stored top-K.
        """
        self.parent.ensure_loaded(self.settings)
        bs = 1 if self.settings.batch_size > 1 else 2
        ref = ModelRef(
            name=f"noise floor (parent, batch size {bs})", source=None, model=self.parent.model,
            tokenizer=self.parent.tokenizer, fingerprint=f"{self.parent.fingerprint}:batch{bs}",
            info={"method": "noise_floor", "settings": {"batch_size": bs}},
        )
        for unit in self.units:  # the floor needs the parent's cached results as its reference
            if self.cache.get(self._parent_key(unit), _record_cls()) is None:
                self.evaluate_child(ModelRef("parent", None, self.parent.model, self.parent.tokenizer, self.parent.fingerprint))
                break
        entry, _ = self.evaluate_child(ref, batch_size=bs)
        return entry

    def report(self, children_entries: list[dict], noise_floor: dict | None = None) -> dict:
        return {
            "schema": "flipcheck.report",
            "version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "flipcheck_version": __version__,
            "parent": {"source": self.parent.source, "fingerprint": self.parent.fingerprint},
            "settings": self.settings.public(),
            "children": children_entries,
            "noise_floor": noise_floor,
        }


def _record_cls():
    from flipcheck.evaluation.lm import Record

    return Record


def _row_dict(row) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(row) if is_dataclass(row) else dict(row)


def child_ref(source: str, name: str | None = None) -> ModelRef:
    """A child on disk; method and settings from its flipcheck.json when flipcheck made it."""
    prov = read_provenance(source) if os.path.isdir(source) else None
    info: dict[str, Any] = {}
    if prov:
        steps = prov.get("recipe") or []
        info["method"] = "+".join(s.get("method", "?") for s in steps) or None
        info["settings"] = steps[0].get("settings") if len(steps) == 1 else steps
        info["compression"] = prov.get("reports", [])
        info["strength"] = prov.get("strength")
    return ModelRef(name=name or Path(source).name, source=source, info=info)


def parent_source_for(child: str) -> str:
    prov = read_provenance(child) if os.path.isdir(child) else None
    if not prov or not prov.get("parent"):
        raise FlipcheckError(
            f"{child!r} has no flipcheck.json naming its parent; pass the parent explicitly: flipcheck eval PARENT CHILD"
        )
    return str(prov["parent"])


def evaluate(
    parent: str | None,
    child: str | list[str],
    *,
    tasks: str | list[str],
    out: str | os.PathLike | None = None,
    include_path: str | list[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    topk: int = 64,
    noise_floor: bool = False,
) -> dict:
    """Compare one or more children with their parent on lm-eval tasks; returns the report dict.

    `parent` may be None when each child's flipcheck.json names it. With `out`, writes
    report.json, samples.jsonl, report.md and report.html there.
    """
    children = [child] if isinstance(child, str) else list(child)
    if not children:
        raise FlipcheckError("no child model given")
    parent = parent or parent_source_for(children[0])
    settings = EvalSettings(
        tasks=tasks if isinstance(tasks, list) else [t for t in tasks.split(",") if t.strip()],
        include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed, batch_size=batch_size,
        topk=topk, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
    )
    for src in [parent, *children]:  # fail on a missing path before any model is loaded
        check_source(src)
    ev = Evaluator(ModelRef("parent", parent), settings, cache_mod.ResultCache(cache_dir, enabled=use_cache))
    entries, rows = [], []
    for c in children:
        ref = child_ref(c)
        entry, r = ev.evaluate_child(ref)
        entries.append(entry)
        rows.extend(r)
        ref.release()
    floor = ev.noise_floor() if noise_floor else None
    report = ev.report(entries, floor)
    if out is not None:
        from flipcheck.evaluation.report import write_report

        write_report(out, report, rows)
    return report
