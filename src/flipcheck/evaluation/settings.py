"""The settings of one evaluation (:class:`EvalSettings`): the one declaration every command and the
recipe schema take, and which of them enter the result cache's keys."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError

from flipcheck.evaluation import cache as cache_mod
from flipcheck.evaluation.kl import DEFAULT_TOPK
from flipcheck.evaluation.options import EvalOptions, one_line, parse_batch_size  # noqa: F401 - re-exported
from flipcheck.evaluation.sampling import parse_sample
from flipcheck.evaluation.tasks import _include_paths, packaged_task_dir, task_manager
from flipcheck.models import resolve_device, resolve_dtype, suggest_batch_size

log = logging.getLogger(__name__)


class EvalSettings(EvalOptions):
    """Everything that decides which instances are scored and how: the user's choices
    (:class:`~flipcheck.evaluation.options.EvalOptions`, declared there once) plus the tasks and the
    library-level knobs below. Bad values fail here in one line, before any model loads."""

    tasks: list[str]
    topk: int = Field(DEFAULT_TOPK, ge=1, json_schema_extra={"cli": False})  # parent top-K log-probs kept per scored position for KL against a cached parent
    n_boot: int = Field(1000, ge=1, json_schema_extra={"cli": False})  # bootstrap resamples of every interval
    doc_ids: dict[str, list[int]] | None = Field(None, json_schema_extra={"cli": False})  # only these doc ids per leaf task (lm-eval's samples=; search's splits)
    _batch_auto: bool = PrivateAttr(default=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise one_line("settings", err) from None

    def replace(self, **changes: Any) -> EvalSettings:
        """A copy with `changes`, checked again."""
        return type(self)(**{**self.model_dump(), **changes})

    def sampling_spec(self):
        """The :class:`~flipcheck.evaluation.sampling.SampleSpec` of `sample`/`samples`/`seed`, None for greedy."""
        return parse_sample(self.sample, self.samples, self.seed)

    def resolve_batch_size(self, source) -> int:
        """``batch_size="auto"``: the largest batch of rows (up to ``max(ctx, 1024)`` tokens) whose float32
        log-probabilities and activations fit half of the device's free memory, from the parent's
        config.json (:func:`flipcheck.models.suggest_batch_size`); 16 on CPU. Recorded in the report.
        Batch size changes no answer (it is not in any cache key; the noise floor measures it)."""
        if self.batch_size == "auto":
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
        fields = self.model_dump(exclude=_NOT_IN_KEY)
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
            **({"batch_size_auto": True} if self._batch_auto else {}),
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
            **({"noise_floor": True} if self.noise_floor else {}),
            **({"trust_remote_code": True} if self.trust_remote_code else {}),
            **({"n_boot": self.n_boot} if self.n_boot != 1000 else {}),
        }


# Settings that do not change per-sample scores: which tasks (the unit is keyed), where task files
# live (their content is keyed), batch size (numerics only: the noise floor measures it), bootstrap.
_NOT_IN_KEY = {"tasks", "include_path", "batch_size", "trust_remote_code", "n_boot", "device", "dtype",
               "metric", "filter", "per_subtask",  # these three choose among the samples every run keeps
               "kl",  # how a child's KL is computed: in the child's key only (the parent's results are the same)
               "texts", "ctx", "scoring",  # corpus settings: in the corpus entries' keys only
               "engine", "parent_engine", "child_engine", "engine_floor",
               "noise_floor"}  # the floors are rows of their own; each model's engine identity is in its own key


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
