"""Run a recipe: compress each child from one parent, evaluate all against the parent once, gate.

The parent is loaded, fingerprinted and scored once; calibration data is tokenized once; each
child starts from a fresh copy of the parent, is compressed, saved under ``OUT/children/NAME`` and
evaluated. After every child the report is rewritten (atomically), so an interrupted run keeps
what it finished, and a re-run skips children whose folder and evaluation are already there.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.pipeline import compress_model, prepare_calibration
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.cache import ResultCache
from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef, cached_fingerprint
from flipcheck.models import load_model, load_tokenizer, read_provenance
from flipcheck.recipes.schema import ChildSpec, EvaluationSpec, Recipe, SweepSpec

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "child"


def resolve_parent(parent: str) -> str:
    """`demo` is the offline demo parent (trained and cached on first use)."""
    if parent == "demo":
        from flipcheck.demo import demo_model_path

        return str(demo_model_path())
    return parent


def _done_child(folder: Path, spec: ChildSpec, parent_fp: str) -> bool:
    prov = read_provenance(folder) if folder.is_dir() else None
    if not prov or prov.get("parent_fingerprint") != parent_fp:
        return False
    steps = [{"method": s.method, "settings": s.config().model_dump(mode="json")} for s in spec.steps]
    return prov.get("recipe") == steps


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Compress and evaluate every child of `recipe`; write the report to `out`; return it."""
    from flipcheck.evaluation.report import write_report

    out = Path(out)
    say = progress or (lambda msg: log.info("%s", msg))
    children = recipe.all_children()
    parent_src = resolve_parent(recipe.parent)
    ev_spec = recipe.evaluation
    settings = EvalSettings(
        tasks=list(ev_spec.tasks), include_path=ev_spec.include_path, num_fewshot=ev_spec.num_fewshot,
        limit=_limit(ev_spec.limit), seed=ev_spec.seed, batch_size=ev_spec.batch_size, device=recipe.device,
        dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
    )
    cache = ResultCache(cache_dir if cache_dir is not None else None, enabled=use_cache)
    say(f"parent: {parent_src}")
    tokenizer = load_tokenizer(parent_src, trust_remote_code=recipe.trust_remote_code)
    parent_model = load_model(parent_src, device=recipe.device, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code)
    parent_fp = cached_fingerprint(parent_src, parent_model)  # memoised per folder: no rehash of a big parent
    parent = ModelRef("parent", parent_src, model=parent_model, tokenizer=tokenizer, fingerprint=parent_fp)
    evaluator = Evaluator(parent, settings, cache)  # checks the task names before any compression
    calibration: Calibration | None = None
    entries: list[dict] = []
    rows: list[dict] = []
    for i, spec in enumerate(children, 1):
        folder = out / "children" / slug(spec.name)
        steps = [(s.method, s.config()) for s in spec.steps]
        info = {
            "method": "+".join(s.method for s in spec.steps),
            "settings": spec.steps[0].settings if len(spec.steps) == 1 else [s.model_dump() for s in spec.steps],
            "strength": spec.strength,
        }
        if _done_child(folder, spec, parent_fp):
            say(f"[{i}/{len(children)}] {spec.name}: compressed in an earlier run")
            prov = read_provenance(folder) or {}
            info["compression"] = prov.get("reports", [])
            ref = ModelRef(spec.name, str(folder), info=info)
        else:
            say(f"[{i}/{len(children)}] {spec.name}: compressing")
            if calibration is None:  # once, for every child's steps: tokenized only if some step needs data
                all_steps = [(s.method, s.config()) for c in children for s in c.steps]
                calibration = prepare_calibration(tokenizer, all_steps, recipe.calibration)
            child_model = copy.deepcopy(parent_model)
            res = compress_model(
                child_model, tokenizer, steps, parent_source=parent_src, out=folder, calibration=calibration,
                strength=spec.strength, parent_fingerprint=parent_fp,
            )
            info["compression"] = [r.to_dict() for r in res.reports]
            ref = ModelRef(spec.name, str(folder), info=info)
            if not res.provenance.get("loader") and not res.provenance.get("quantized_on_load"):
                ref.model, ref.tokenizer = child_model, tokenizer  # evaluate the in-memory child, no reload
            del child_model
        say(f"[{i}/{len(children)}] {spec.name}: evaluating")
        entry, child_rows = evaluator.evaluate_child(ref)
        ref.model = None
        entries.append(entry)
        rows.extend(child_rows)
        write_report(out, evaluator.report(entries), rows)  # keep what is finished
    floor = evaluator.noise_floor() if ev_spec.noise_floor else None
    report = evaluator.report(entries, floor)
    report["recipe"] = recipe.model_dump(mode="json", exclude_none=True)
    write_report(out, report, rows)
    return report


def _limit(limit: float | None) -> int | float | None:
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)


def sweep(
    parent: str,
    method: str,
    grid: dict[str, list[Any]],
    *,
    tasks: list[str] | str = "flipcheck_demo_facts,flipcheck_demo_letters",
    out: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict:
    """Sweep one method's strength: ``sweep("demo", "wanda", {"sparsity": [0.1, 0.3, 0.5]}, out=...)``."""
    task_list = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    try:
        recipe = Recipe(
            name=f"sweep-{method}",
            parent=parent,
            calibration=calibration or {},
            sweeps=[SweepSpec(method=method, grid=grid, settings=settings or {})],
            evaluation=EvaluationSpec(
                tasks=task_list, include_path=include_path, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size
            ),
            device=device,
            dtype=dtype,
        )
    except Exception as err:  # pydantic's ValidationError wraps our FlipcheckError text
        raise FlipcheckError(f"sweep {method}: {_first_error(err)}") from err
    return run_recipe(recipe, out, cache_dir=cache_dir, progress=progress)


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
    return str(err)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['sparsity=0.1,0.2', 'mask=2:4'] -> {'sparsity': ['0.1', '0.2'], 'mask': ['2:4']}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise FlipcheckError(f"--grid {item!r}: expected key=v1,v2,... (e.g. sparsity=0.1,0.2,0.3)")
        k, v = item.split("=", 1)
        values = [x.strip() for x in v.split(",") if x.strip()]
        if not values:
            raise FlipcheckError(f"--grid {item!r}: no values")
        grid[k.strip()] = values
    return grid
