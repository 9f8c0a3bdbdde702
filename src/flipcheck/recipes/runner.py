"""Run a recipe: compress each child from one parent, evaluate all against the parent once, gate.

The parent is loaded, fingerprinted and scored once; calibration data is tokenized once; each
child starts from the parent loaded afresh from its files (never a second copy in memory), is compressed, saved under ``OUT/children/NAME`` and
evaluated. After every child the report is rewritten (atomically), so an interrupted run keeps
what it finished, and a re-run skips children whose folder and evaluation are already there.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flipcheck import __version__
from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.calibration_data import default_source
from flipcheck.compressors.pipeline import compress_model, prepare_calibration, step_needs_calibration
from flipcheck.demo import demo_model_path
from flipcheck.evaluation.cache import ResultCache
from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
from flipcheck.models import (
    ModelSource,
    load_model,
    load_tokenizer,
    read_provenance,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from flipcheck.recipes.schema import ChildSpec, Recipe

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "child"


def resolve_parent(parent: str) -> str:
    """`demo` is the offline demo parent (trained and cached on first use)."""
    if parent == "demo":
        return str(demo_model_path())
    return parent


def resolve_parent_source(parent: str) -> ModelSource:
    """The recipe's parent resolved once (hub id or folder): fingerprint, loader, provenance."""
    return resolve_source(resolve_parent(parent))


def made_with(spec: ChildSpec, parent_fp: str, recipe: Recipe) -> dict[str, Any]:
    """Everything that made a child: it is reused by a later run only when all of it is equal."""
    steps = [(s.method, s.config()) for s in spec.steps]
    cal = recipe.calibration
    uses_data = any(step_needs_calibration(n, c) for n, c in steps)
    return {
        "parent_fingerprint": parent_fp,
        "steps": [{"method": n, "settings": c.model_dump(mode="json")} for n, c in steps],
        "calibration": {**cal.model_dump(mode="json"), "content": _calibration_content(cal.source)} if uses_data else None,
        "dtype": str(resolve_dtype(recipe.dtype, resolve_device(recipe.device))),
        "flipcheck_version": __version__,
    }


def _calibration_content(source: str) -> str | None:
    """Content hash of a local calibration file or folder (None for hub datasets and the demo text)."""
    import hashlib

    p = Path(source).expanduser()
    if not p.exists():
        return None
    h = hashlib.sha256()
    for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
        h.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _done_child(folder: Path, made: dict[str, Any]) -> bool:
    prov = read_provenance(folder) if folder.is_dir() else None
    return bool(prov) and prov.get("made_with") == made


def with_calibration_source(recipe: Recipe, parent_folder: Path | None) -> Recipe:
    """`recipe` with its calibration source filled in when it names none: the demo's own text for
    the demo parent, else the parent's default (:func:`calibration_data.default_source`)."""
    if recipe.calibration.source is not None:
        return recipe

    source = "demo" if recipe.parent == "demo" else default_source(parent_folder)
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"source": source})})


def eval_settings(recipe: Recipe) -> EvalSettings:
    """The evaluator's settings of a recipe: every field of its ``evaluation`` section that
    :class:`EvalSettings` declares, by name (one declaration, no list to keep in step), plus the
    recipe-level device, dtype and trust_remote_code."""
    spec = recipe.evaluation.model_dump()
    fields = set(EvalSettings.model_fields)
    kwargs = {k: v for k, v in spec.items() if k in fields}
    kwargs.update(tasks=list(spec["tasks"]), texts=list(spec["texts"]), limit=_limit(spec["limit"]),
                  device=recipe.device, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code)
    return EvalSettings(**kwargs)


class RecipeRun:
    """One recipe's shared state: the resolved parent, its tokenizer, the evaluator (parent scored
    or found in the cache) and the calibration data (tokenized once, on first need).

    The driver builds one for the whole run; a Ray worker builds its own from the same recipe dump
    (:mod:`flipcheck.orchestrate.work`), so a child is made and scored by the same code either way.
    """

    def __init__(self, recipe: Recipe, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 say: Progress | None = None):
        self.say = say or (lambda msg: log.info("%s", msg))
        self.children = recipe.all_children()
        self.parent_src = resolve_parent_source(recipe.parent)
        self.recipe = recipe = with_calibration_source(recipe, self.parent_src.folder)
        self.settings = eval_settings(recipe)
        self.cache = ResultCache(cache_dir if cache_dir is not None else None, enabled=use_cache)
        self.tokenizer = load_tokenizer(self.parent_src, trust_remote_code=recipe.trust_remote_code)
        self.parent_fp = self.parent_src.fingerprint  # from the files (memoised), never from the loaded weights
        parent = ModelRef("parent", self.parent_src, tokenizer=self.tokenizer, fingerprint=self.parent_fp,
                          engine=self.settings.engine_of("parent"))
        self.evaluator = Evaluator(parent, self.settings, self.cache)  # checks the task names before any compression
        self.calibration: Calibration | None = None

    def child(self, i: int, spec: ChildSpec, out: Path, *, evaluate: bool = True) -> tuple[dict, list[dict]] | ModelRef:
        """Compress child `i` (1-based) into ``OUT/children/NAME`` unless an earlier run made it with
        the same settings, then evaluate it: (report entry, per-question rows). With ``evaluate=False``
        the saved child's :class:`ModelRef` (an evaluation shard scores it elsewhere)."""
        recipe, children, say = self.recipe, self.children, self.say
        folder = out / "children" / slug(spec.name)
        steps = [(s.method, s.config()) for s in spec.steps]
        info = {
            "method": "+".join(s.method for s in spec.steps),
            "settings": spec.steps[0].settings if len(spec.steps) == 1 else [s.model_dump() for s in spec.steps],
            "strength": spec.strength,
        }
        made = made_with(spec, self.parent_fp, recipe)
        if _done_child(folder, made):
            say(f"[{i}/{len(children)}] {spec.name}: compressed in an earlier run")
            prov = read_provenance(folder) or {}
            info["compression"] = prov.get("reports", [])
            ref = ModelRef(spec.name, str(folder), info=info, engine=self.settings.engine_of("child"))
        else:
            say(f"[{i}/{len(children)}] {spec.name}: compressing")
            if self.evaluator.on_step is not None:
                self.evaluator.on_step(f"{spec.name}: compress")
            if self.calibration is None:  # once, for every child's steps: tokenized only if some step needs data
                all_steps = [(s.method, s.config()) for c in children for s in c.steps]
                self.calibration = prepare_calibration(self.tokenizer, all_steps, recipe.calibration)
            # a fresh parent from disk, not a deepcopy of the one in memory: cheaper (SmolLM2-135M: 0.1 s
            # against 1.4 s), and under device_map="auto" it is spread over the GPUs like the parent
            child_model = load_model(
                self.parent_src, device=recipe.device, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code
            )
            res = compress_model(
                child_model, self.tokenizer, steps, parent_source=self.parent_src.ref, out=folder,
                calibration=self.calibration, strength=spec.strength, parent_fingerprint=self.parent_fp,
                extra_provenance={"made_with": made},
            )
            info["compression"] = [r.to_dict() for r in res.reports]
            ref = ModelRef(spec.name, str(folder), info=info, engine=self.settings.engine_of("child"))
            on_disk_only = res.provenance.get("loader") or res.provenance.get("quantized_on_load") or res.provenance.get("gguf")
            if evaluate and not on_disk_only:
                ref.model, ref.tokenizer = child_model, self.tokenizer  # evaluate the in-memory child, no reload
            del child_model, res  # res.model is the child: hold no child past its evaluation
        if not evaluate:
            _return_freed_memory()
            return ref
        say(f"[{i}/{len(children)}] {spec.name}: evaluating")
        entry, child_rows = self.evaluator.evaluate_child(ref)
        ref.model = None
        _return_freed_memory()
        return entry, child_rows


def _return_freed_memory() -> None:
    """Hand the freed child's memory back to the OS before the next child loads.

    glibc keeps freed heap memory of a finished child (tensors of a few MB come from its arenas
    once large frees raised its mmap threshold), so without a trim the process grows by about one
    child before reusing it. A no-op where ``malloc_trim`` does not exist.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def _limit(limit: float | None) -> int | float | None:
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
    return str(err)


