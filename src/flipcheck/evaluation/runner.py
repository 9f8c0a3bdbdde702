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
import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import cache as cache_mod
from flipcheck.evaluation import generations
from flipcheck.evaluation.corpus import DEFAULT_CTX
from flipcheck.evaluation.kl import DEFAULT_TOPK, kl_method
from flipcheck.evaluation.report.schema import child_entry, new_report
from flipcheck.evaluation.tasks import (
    _include_paths,
    check_filter,
    leaf_weights,
    packaged_task_dir,
    resolve_tasks,
    task_manager,
    task_tree,
)
from flipcheck.models import (
    ModelSource,
    fingerprint,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

log = logging.getLogger(__name__)

# Version of what a child's cached records mean (2: each distinct scored position counted once, NaN/inf
# counts per record); part of every child key, so entries of an older engine are never reused.
ENGINE_VERSION = 4  # 3: records carry the reverse KL, KL(child || parent); 4: generations' finish and tf_miss


@dataclass
class EvalSettings:
    """Everything that decides which instances are scored and how."""

    tasks: list[str]
    include_path: str | list[str] | None = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    seed: int = 1234
    batch_size: int | str = 16  # sequences per forward, or "auto": the largest that fits the device (resolved once)
    topk: int = DEFAULT_TOPK  # parent top-K log-probs kept per scored position for KL against a cached parent
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    n_boot: int = 1000
    metric: str | None = None  # headline and gate figure: acc or acc_norm (default: acc_norm where reported)
    filter: str | None = None  # lm-eval filter of generative tasks (default: the task's first)
    per_subtask: bool = False  # every leaf task its own row (default: groups as one row, as named)
    kl: str = "topk"  # vocabulary KL of every child: "topk" (bound from the parent's top-K) or "exact" (lock-step)
    texts: list[str] = field(default_factory=list)  # --text corpora: files or hf:NAME[:CONFIG[:SPLIT]]
    ctx: int = DEFAULT_CTX  # tokens per corpus window
    scoring: str = "all"  # corpus positions scored per window: all, or half (llama.cpp's second half)
    engine: str | None = None  # scoring engine of every model (None: transformers, llama.cpp for GGUF files)
    parent_engine: str | None = None  # the parent's, instead of `engine`
    child_engine: str | None = None  # every child's, instead of `engine`
    engine_floor: bool = False  # a floor row: the parent on another engine (llama.cpp on an F32 GGUF of it)
    sample: str | None = None  # seed-synchronised sampling, e.g. "temperature=0.7,top_p=0.95" (None: greedy)
    samples: int = 1  # generations per question with `sample`
    doc_ids: dict[str, list[int]] | None = None  # only these doc ids per leaf task (lm-eval's samples=; search's splits)

    def __post_init__(self) -> None:
        from flipcheck.evaluation.corpus import check_scoring
        from flipcheck.evaluation.samples import check_metric

        check_metric(self.metric)
        check_scoring(self.scoring, self.ctx)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise FlipcheckError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise FlipcheckError(f"limit must be > 0 (a count, or a fraction in (0, 1]), got {self.limit}")
        self.batch_size = parse_batch_size(self.batch_size)
        if self.topk < 1:
            raise FlipcheckError(f"topk must be >= 1, got {self.topk}")
        from flipcheck.evaluation.kl import KL_METHODS

        if self.kl not in KL_METHODS:
            raise FlipcheckError(f"kl={self.kl!r}: allowed are {', '.join(KL_METHODS)}")
        from flipcheck.evaluation.engines import check_engine

        for name in ("engine", "parent_engine", "child_engine"):
            setattr(self, name, check_engine(getattr(self, name)))
        self.sampling_spec()  # a bad --sample / --samples fails before any model loads

    def sampling_spec(self):
        """The :class:`~flipcheck.evaluation.sampling.SampleSpec` of `sample`/`samples`/`seed`, None for greedy."""
        from flipcheck.evaluation.sampling import parse_sample

        return parse_sample(self.sample, self.samples, self.seed)

    @property
    def _auto_batch(self) -> bool:
        return bool(getattr(self, "_batch_auto", False))

    def resolve_batch_size(self, source) -> int:
        """``batch_size="auto"``: the largest batch of rows (up to ``max(ctx, 1024)`` tokens) whose float32
        log-probabilities and activations fit half of the device's free memory, from the parent's
        config.json (:func:`flipcheck.models.suggest_batch_size`); 16 on CPU. Recorded in the report.
        Batch size changes no answer (it is not in any cache key; the noise floor measures it)."""
        if self.batch_size == "auto":
            from flipcheck.models import suggest_batch_size

            self.batch_size = suggest_batch_size(source, max(self.ctx, 1024), device=self.device, dtype=self.dtype)
            self._batch_auto = True
            log.info("--batch-size auto: %d", self.batch_size)
        return int(self.batch_size)

    def engine_of(self, role: str) -> str | None:
        """The engine asked for the parent (`role` "parent") or the children (None: each model's default)."""
        return (self.parent_engine if role == "parent" else self.child_engine) or self.engine

    def key_fields(self) -> dict[str, Any]:
        """Every setting that changes scores (a field added later enters by default)."""
        import lm_eval

        dev = resolve_device(self.device)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_IN_KEY}
        return {
            **fields,
            "dtype": str(resolve_dtype(self.dtype, dev)),
            "device_kind": "cuda" if dev == "auto" else dev.split(":")[0],
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
            **({"batch_size_auto": True} if self._auto_batch else {}),
            "topk": self.topk,
            "device": resolve_device(self.device),
            "dtype": str(resolve_dtype(self.dtype, resolve_device(self.device))).replace("torch.", ""),
            "metric": self.metric or "acc_norm where reported",
            "filter": self.filter,
            "per_subtask": self.per_subtask,
            "kl": self.kl,
            **({"texts": list(self.texts)} if self.texts else {}),
            "ctx": self.ctx,
            "scoring": self.scoring,
            **{k: getattr(self, k) for k in ("engine", "parent_engine", "child_engine") if getattr(self, k)},
        }


def parse_batch_size(value: int | str) -> int | str:
    """An integer >= 1, or ``"auto"`` (resolved by :meth:`EvalSettings.resolve_batch_size`)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise FlipcheckError(f"--batch-size {value!r}: allowed are an integer >= 1 or auto") from None
    if not isinstance(value, int) or value < 1:
        raise FlipcheckError(f"batch_size must be >= 1 or auto, got {value!r}")
    return value


# Settings that do not change per-sample scores: which tasks (the unit is keyed), where task files
# live (their content is keyed), batch size (numerics only: the noise floor measures it), bootstrap.
_NOT_IN_KEY = {"tasks", "include_path", "batch_size", "trust_remote_code", "n_boot", "device", "dtype",
               "metric", "filter", "per_subtask",  # these three choose among the samples every run keeps
               "kl",  # how a child's KL is computed: in the child's key only (the parent's results are the same)
               "texts", "ctx", "scoring",  # corpus settings: in the corpus entries' keys only
               "engine", "parent_engine", "child_engine", "engine_floor"}  # each model's engine identity is in its own key


def _task_config_hash(unit: str, include_path) -> str | None:
    """lm-eval's config of `unit` (and its YAML's content) from the task index; None when it has none."""
    try:
        entry = task_manager(include_path, [unit]).task_index.get(unit)
    except Exception:  # the task names were checked already; an index without the entry keys nothing
        return None
    if entry is None:
        return None
    get = entry.get if isinstance(entry, dict) else lambda name: getattr(entry, name, None)
    h = hashlib.sha256(json.dumps(get("cfg"), sort_keys=True, default=str).encode())
    path = get("yaml_path")
    if path is not None and os.path.isfile(str(path)):
        h.update(Path(str(path)).read_bytes())
    return h.hexdigest()[:16]


def _user_include_paths(include_path) -> tuple[str, ...]:
    packaged = str(packaged_task_dir())
    return tuple(p for p in _include_paths(include_path) if p != packaged)


def _unit_files(unit: str) -> str | None:
    """The packaged demo tasks' content enters only the keys of demo task units."""
    if not unit.startswith("flipcheck_demo"):
        return None
    return cache_mod.folder_content_hash((str(packaged_task_dir()),))


@dataclass
class ModelRef:
    """A model to evaluate: its resolved source (identity), and lazily its tokenizer and weights.

    `source` is what the user wrote (hub id or folder) or a :class:`ModelSource`; it is resolved
    once, and fingerprint, tokenizer and weights all come from that one resolution.
    """

    name: str
    source: str | ModelSource | None
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # method, settings, strength, compression reports
    resolved: ModelSource | None = field(default=None, repr=False)
    engine: str | None = None  # the scoring engine asked for (None: the source's default)
    _identity: tuple[Any, dict[str, Any]] | None = field(default=None, repr=False)
    _engine_identity: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.source, ModelSource):
            self.resolved, self.source = self.source, self.source.spec

    def src(self) -> ModelSource:
        if self.resolved is None:
            if self.source is None:
                raise FlipcheckError(f"model {self.name!r} has neither weights nor a source")
            self.resolved = resolve_source(self.source)
        return self.resolved

    def ensure_identity(self, settings: EvalSettings) -> None:
        """Tokenizer, fingerprint and engine identity, without loading the weights."""
        if self.tokenizer is None and not self.served:  # a served model is encoded with the parent's tokenizer
            self.tokenizer = load_tokenizer(self.src(), trust_remote_code=settings.trust_remote_code)
        if self.fingerprint is None:
            self.fingerprint = cached_fingerprint(self.resolved or self.source, self.model)
        self.engine_identity(settings)

    @property
    def served(self) -> bool:
        """An already served model (no weights here; the parent's tokenizer encodes for it)."""
        return self.source is None and getattr(self.model, "name", None) == "served"

    def ensure_loaded(self, settings: EvalSettings) -> None:
        """The weights, behind the engine asked for: a torch model (transformers) or an engine object."""
        if self.model is None:
            from flipcheck.evaluation.engines import open_engine
            from flipcheck.evaluation.engines.transformers import TransformersEngine

            log.info("loading %s", self.source)
            eng = open_engine(self.src(), self.engine, device=settings.device, dtype=settings.dtype,
                              trust_remote_code=settings.trust_remote_code)
            self.model = eng.model if isinstance(eng, TransformersEngine) and not eng.dequantized_from else eng
        self.ensure_identity(settings)

    def engine_identity(self, settings: EvalSettings | None = None) -> dict[str, Any]:
        """The scoring engine's identity (name, version, dtype, settings that change numbers), known
        before any weight loads; part of every cache key of this model."""
        if self._engine_identity is None:
            from flipcheck.evaluation.engines import as_engine, engine_identity

            if self.source is None and self.model is not None:  # in memory: what it is
                self._engine_identity = as_engine(self.model).identity()
            else:
                dev = resolve_device(settings.device if settings else None)
                self._engine_identity = engine_identity(self.src(), self.engine,
                                                        resolve_dtype(settings.dtype if settings else None, dev))
        return self._engine_identity

    def identity_key(self) -> dict[str, Any]:
        """What besides the fingerprint changes this model's scores: tokenizer, config (max length)."""
        if self._identity is None or self._identity[0] is not self.tokenizer:
            self._identity = (self.tokenizer, {
                "tokenizer": tokenizer_key(self.tokenizer) if self.tokenizer is not None else None,
                "config": self.src().config_hash() if self.source is not None else None,
                "scorer": self.engine_identity(),
            })
        return self._identity[1]

    def release(self) -> None:
        """Drop the weights (a sweep keeps one child in memory at a time)."""
        if self.source is not None:
            close = getattr(self.model, "close", None)
            if close is not None and not isinstance(self.model, torch.nn.Module):
                close()
            self.model = None


def cached_fingerprint(source: str | ModelSource | None, model: torch.nn.Module | None = None) -> str:
    """A model's fingerprint: from its resolved source (never loading weights), or the in-memory weights."""
    if source is not None:
        return resolve_source(source).fingerprint
    if model is None:
        raise FlipcheckError("cannot fingerprint a model with neither a source nor weights")
    return fingerprint(model)


def tokenizer_hash(tok) -> str:
    """The vocabulary (token -> id): parent and child must share it for flips and KL to mean anything."""
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


_TOKENIZER_PROBE = "Question: The  café's answer is 42.\nAnswer:"


def tokenizer_key(tok) -> str:
    """Everything about a tokenizer that changes scores: vocabulary, merges, normalisation, added and
    special tokens, BOS/EOS handling (the fast tokenizer's full pipeline without its padding state),
    the length limit, and how a probe text encodes."""
    backend = getattr(tok, "backend_tokenizer", None)
    parts: dict[str, Any] = {"vocab": tokenizer_hash(tok)}
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        parts["pipeline"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    parts["special"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items()) if k != "pad_token"}
    parts["added"] = sorted((i, repr(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items())
    for attr in ("add_bos_token", "add_eos_token", "model_max_length"):
        parts[attr] = getattr(tok, attr, None)
    parts["probe"] = tok(_TOKENIZER_PROBE)["input_ids"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        settings.resolve_batch_size(parent.resolved or parent.source or parent.model)
        from flipcheck.evaluation.corpora import Corpora

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
        from flipcheck.evaluation.records import nonfinite_by_task
        from flipcheck.evaluation.samples import aggregate, build_rows, set_headline, summarize_task

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
        from flipcheck.evaluation.records import Record

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
        from flipcheck.evaluation.records import Record

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
        from flipcheck.evaluation.floor import engine_floor, noise_floor

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


def _vocab_width(ref: ModelRef) -> int:
    """The width of `ref`'s distributions without loading it: the config's vocab_size (the tokenizer's
    length where no config is there)."""
    if isinstance(ref.model, torch.nn.Module):
        from flipcheck.evaluation.engines import as_engine

        return as_engine(ref.model).vocab
    try:
        src = ref.src()
        if not src.gguf:
            cfg = json.loads((src.local_folder(weights=False) / "config.json").read_text())
            size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if size:
                return int(size)
    except (OSError, ValueError, FlipcheckError):
        pass
    return len(ref.tokenizer)


def _record_cls() -> type:
    from flipcheck.evaluation.records import Record

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
    from flipcheck.evaluation.samples import summarize_group

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


def served_ref(url: str, model: str, settings: EvalSettings, tokenizer_from: ModelSource | None = None) -> ModelRef:
    """A model that is already served (OpenAI-compatible /v1/completions); nothing is contacted yet. A
    served child is encoded with the parent's tokenizer; a served parent with `tokenizer_from`'s (the
    PARENT the user named, whose config also gives the vocabulary width)."""
    from flipcheck.evaluation.engines.served import ServedEngine

    eng = ServedEngine(url, model, topk=settings.topk)
    ref = ModelRef(name="parent" if tokenizer_from else model, source=None, model=eng,
                   fingerprint=eng.fingerprint(), info={"served": eng.url})
    if tokenizer_from is not None:
        local = ModelRef("tokenizer", tokenizer_from)
        local.tokenizer = ref.tokenizer = load_tokenizer(tokenizer_from, trust_remote_code=settings.trust_remote_code)
        eng.bind(_vocab_width(local))
    return ref


def child_ref(source: str | ModelSource, name: str | None = None, engine: str | None = None) -> ModelRef:
    """A child (folder or hub id); method and settings from its flipcheck.json when flipcheck made it."""
    ms = resolve_source(source)
    prov = ms.provenance
    info: dict[str, Any] = {}
    if prov:
        steps = prov.get("recipe") or []
        info["method"] = "+".join(s.get("method", "?") for s in steps) or None
        info["settings"] = steps[0].get("settings") if len(steps) == 1 else steps
        info["compression"] = prov.get("reports", [])
        info["strength"] = prov.get("strength")
    if ms.gguf:
        info.setdefault("method", "gguf")  # a GGUF flipcheck did not make
        default = Path(ms.gguf).stem if not prov else Path(ms.folder).name  # type: ignore[arg-type]
    else:
        default = ms.hub_id or Path(ms.spec).name
    return ModelRef(name=name or default, source=ms, info=info, engine=engine)


def parent_source_for(child: str | ModelSource) -> str:
    """The parent a child's flipcheck.json names (a hub id, or a folder)."""
    ms = resolve_source(child)
    prov = ms.provenance
    if not prov or not prov.get("parent"):
        raise FlipcheckError(
            f"{ms.spec!r} has no flipcheck.json naming its parent; pass the parent explicitly: flipcheck eval PARENT CHILD"
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
    batch_size: int | str = 16,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    topk: int = DEFAULT_TOPK,
    noise_floor: bool = False,
    metric: str | None = None,
    filter: str | None = None,
    per_subtask: bool = False,
    kl: str = "topk",
    texts: list[str] | None = None,
    ctx: int = DEFAULT_CTX,
    scoring: str = "all",
    executor: Any = None,
    engine: str | None = None,
    parent_engine: str | None = None,
    child_engine: str | None = None,
    engine_floor: bool = False,
    served: list[tuple[str, str]] | None = None,
    served_parent: tuple[str, str] | None = None,
    on_step: Any = None,
    sample: str | None = None,
    samples: int = 1,
    doc_ids: dict[str, list[int]] | None = None,
) -> dict:
    """Compare one or more children with their parent on lm-eval tasks; returns the report dict.

    `parent` may be None when each child's flipcheck.json names it. With `out`, writes
    report.json, samples.jsonl, report.md and report.html there. `metric` ("acc" or "acc_norm")
    picks the headline figures (default: acc_norm where a task reports it), `filter` a generative
    task's lm-eval filter, and `per_subtask` reports every task of a group as its own row. `kl`:
    every child's vocabulary KL estimated from the parent's stored top-K and sampled tail (``"topk"``,
    K+1 model passes for K children), the top-K + tail-bucket lower bound (``"bound"``) or exact with
    the parent in lock-step (``"exact"``). `served`: (URL, model name) of children already served behind
    an OpenAI-compatible /v1/completions; `served_parent`: the parent's (`parent` then gives the
    tokenizer). A report with a served model has the bound as its KL method. `doc_ids`: only these doc
    ids per leaf task (lm-eval's ``samples=``, as search's splits use it).
    """
    children = [child] if isinstance(child, str) else list(child or [])
    if not children and not served:
        raise FlipcheckError("no child model given")
    child_sources = [resolve_source(c) for c in children]  # a missing path or hub id fails before any loading
    if parent is None and not child_sources:
        raise FlipcheckError("a served child needs the parent named (its flipcheck.json is not here to read)")
    parent_src = resolve_source(parent or parent_source_for(child_sources[0]))
    kl = served_kl(kl, list(served or []) + ([served_parent] if served_parent else []), texts)
    if served_parent and (noise_floor or engine_floor):
        raise FlipcheckError("--noise-floor and --engine-floor run the parent's weights here; a served parent has none")
    settings = EvalSettings(
        tasks=tasks if isinstance(tasks, list) else [t for t in tasks.split(",") if t.strip()],
        include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed, batch_size=batch_size,
        topk=topk, device=device, dtype=dtype, trust_remote_code=trust_remote_code, metric=metric, filter=filter,
        per_subtask=per_subtask, kl=kl, texts=list(texts or []), ctx=ctx, scoring=scoring,
        engine=engine, parent_engine=parent_engine, child_engine=child_engine, engine_floor=engine_floor,
        sample=sample, samples=samples, doc_ids=doc_ids,
    )
    parent_ref = (ModelRef("parent", parent_src, engine=settings.engine_of("parent")) if not served_parent
                  else served_ref(*served_parent, settings, tokenizer_from=parent_src))
    ev = Evaluator(parent_ref, settings, cache_mod.ResultCache(cache_dir, enabled=use_cache))
    ev.on_step = on_step  # progress: "CHILD: tasks", "CHILD: texts" (the CLI draws them)
    refs = [child_ref(c, engine=settings.engine_of("child")) for c in child_sources]
    refs += [served_ref(url, name, settings) for url, name in served or []]
    for ref in refs:  # vocabularies and engines checked before the parent or any child is scored
        ev.check_child(ref)
    ev.preflight(refs)
    from flipcheck.executors import finish_report, get_executor

    done = get_executor(executor).evaluate_children(ev, refs, Path(out) if out is not None else None,
                                                    lambda msg: log.info("%s", msg))
    floor = ev.noise_floor(numerics=noise_floor) if noise_floor or engine_floor else None
    report = finish_report(ev.report(done.entries, floor), done.failed, done.info)
    if out is not None:
        from flipcheck.evaluation.report import write_report

        write_report(out, report, done.rows)
    return report
