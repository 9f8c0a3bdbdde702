"""The settings of one evaluation (:class:`EvalSettings`): the one declaration every command and the
recipe schema take, and which of them enter the result cache's keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import cache as cache_mod
from flipcheck.evaluation.corpus import DEFAULT_CTX
from flipcheck.evaluation.kl import DEFAULT_TOPK
from flipcheck.evaluation.tasks import _include_paths, packaged_task_dir, task_manager
from flipcheck.models import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


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
            # shown where they are not the default (a report of a default run stays as it was)
            **({"sample": self.sample, "samples": self.samples} if self.sample else {}),
            **({"engine_floor": True} if self.engine_floor else {}),
            **({"trust_remote_code": True} if self.trust_remote_code else {}),
            **({"n_boot": self.n_boot} if self.n_boot != 1000 else {}),
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
