"""The search loop: the most compressed child that meets every budget, verified on the user's tasks
(:class:`Search`; :func:`flipcheck.decide.search.search` is its entry, around it the steps of
:mod:`.search_steps`).

    flipcheck search PARENT --method rtn --choices scheme=W4A16,W8A16 --max-flips 2% --tasks arc_easy --out DIR

1. **Uniform children.** One child per compressing choice (every layer W4A16; every layer W8A16),
   made and evaluated like any recipe child (:class:`~flipcheck.recipes.runner.RecipeRun`: the
   parent is scored once, into the cache; each child costs one compression and one child pass).
2. **Sensitivities, on text.** For each uniform child and each decoder layer l, the text KL of the
   parent with that child's layer l swapped in alone (localize's ``kl_swap_in``,
   :func:`~flipcheck.decide.localize.swap_in_kl`): d[l, c]. A layer that keeps the parent's has
   d = 0; a dropped layer (layer_drop) is a :class:`~flipcheck.decide.localize.SkipLayer` swapped
   in. Sizes s[l, c]: the storage bits of layer l's Linears in that child, as
   :func:`~flipcheck.compressors.stats.linear_storage` counts them (:mod:`.search_space`).
3. **Proposals.** Assuming damage adds up over layers, the smallest allocation with Σ d ≤ D is a
   multiple-choice knapsack, solved exactly (:func:`~flipcheck.decide.allocate.smallest_within`).
   D is searched between the additive damage of the smallest verified child that passes (D_lo)
   and of the least damaging one that fails (D_hi): first by interpolating the judged figure
   (flips, else text KL, else KL) linearly to its budget, then by bisection.
4. **Verification.** Every proposal is compressed and evaluated for real and judged by the gate's
   own logic (:func:`flipcheck.gate.check`, with ``--confidence`` on the Clopper–Pearson upper
   bound of flips and the lower bound of Δacc). Where additivity fails (a proposal fails its
   budget) D_hi moves down; when the knapsack has nothing new between the bounds, the smallest
   failing child is repaired greedily: its most damaging layer moves to the next safer choice
   until the allocation is new.
5. **Bounded.** At most ``max_candidates`` children are verified (uniform ones included). The
   winner is the smallest verified child that passes, so it is never larger than the smallest
   uniform child that passes.

Each verified candidate is kept in ``DIR/search-state.json`` as it finishes (on Ray: as its round
finishes; a child finished within an interrupted round is not compressed again either, its folder's
``made_with`` matches, and its evaluation comes from the cache), keyed by everything
that made and scored it (the child's ``made_with``: parent fingerprint, step settings, calibration,
dtype, version; and the evaluation settings); the sensitivities likewise (by their child and the
probe text). A search run again with the same arguments re-verifies nothing; with other budgets it
reuses every candidate it already has and judges them anew.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration
from flipcheck.compressors.checks import parent_config
from flipcheck.compressors.stats import linear_storage
from flipcheck.decide.budgets import BUDGET_NAMES, Budgets  # noqa: F401 - re-exported
from flipcheck.decide.localize import SkipLayer, _layers, _logits, swap_in_kl
from flipcheck.decide.search_space import PRUNERS, Space, digest, size_bits
from flipcheck.errors import FlipcheckError
from flipcheck.files import jsonable, write_json_atomic
from flipcheck.orchestrate.children import cache_root, recipe_children
from flipcheck.recipes.runner import made_with, slug
from flipcheck.recipes.schema import ChildSpec, StepSpec

log = logging.getLogger(__name__)

SCHEMA = "flipcheck.search"
VERSION = 1
STATE = "search-state.json"
Say = Callable[[str], None]


# --------------------------------------------------------------------------- state


@dataclass
class Candidate:
    """One verified child: what it is, what it measured, how it was judged."""

    key: str
    name: str
    kind: str  # uniform, milp, repair
    allocation: list[int]
    settings: dict[str, Any]
    entry: dict[str, Any]
    folder: str
    target: float | None = None  # the damage budget D the knapsack was given (milp)
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    # judged on this run
    passed: bool = False
    verdicts: list[str] = field(default_factory=list)
    figure: float | None = None
    damage: float | None = None  # Σ d[l, choice] under the additive model
    predicted_size: float | None = None

    def stored(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("key", "name", "kind", "allocation", "settings", "entry", "folder",
                                               "target", "seconds")}

    @property
    def report(self) -> dict[str, Any]:
        reports = self.entry.get("compression") or [{}]
        return reports[-1] if reports else {}

    def size(self, method: str) -> float | None:
        return size_bits(method, self.report)


class State:
    """DIR/search-state.json: verified candidates and sensitivities by key, rewritten atomically."""

    def __init__(self, folder: Path):
        import json

        self.path = folder / STATE
        data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                log.warning("%s is not valid JSON; starting afresh", self.path)
        if data.get("schema") != SCHEMA + ".state":
            data = {}
        self.candidates: dict[str, dict] = dict(data.get("candidates") or {})
        self.probes: dict[str, dict] = dict(data.get("probes") or {})

    def save(self) -> None:
        write_json_atomic(self.path, jsonable({"schema": SCHEMA + ".state", "version": VERSION,
                                               "candidates": self.candidates, "probes": self.probes}))


class _Clock:
    """Seconds per kind of step (compress, tasks, texts) from the evaluator's step hook."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.kind: str | None = None
        self.t = time.perf_counter()

    def step(self, message: str) -> None:
        self.close()
        self.kind = message.rsplit(": ", 1)[-1]

    def close(self) -> None:
        now = time.perf_counter()
        if self.kind is not None:
            self.totals[self.kind] = self.totals.get(self.kind, 0.0) + now - self.t
        self.kind, self.t = None, now

    def split(self, before: Mapping[str, float]) -> dict[str, float]:
        comp = self.totals.get("compress", 0.0) - before.get("compress", 0.0)
        ev = sum(v for k, v in self.totals.items() if k != "compress") - sum(v for k, v in before.items() if k != "compress")
        return {"compress": round(comp, 3), "evaluate": round(ev, 3)}


# --------------------------------------------------------------------------- the search


@dataclass
class Tables:
    """Per layer and choice: size (bits) and damage (text KL of that layer alone)."""

    sizes: list[list[float]]
    damages: list[list[float]]

    def damage(self, alloc: Sequence[int]) -> float:
        return float(sum(self.damages[i][k] for i, k in enumerate(alloc)))

    def size(self, alloc: Sequence[int]) -> float:
        return float(sum(self.sizes[i][k] for i, k in enumerate(alloc)))


class Search:
    def __init__(self, space: Space, budgets: Budgets, run, out: Path, executor, *, probe: dict[str, Any],
                 max_candidates: int, per_round: int, say: Say, on_step: Say | None = None):
        self.space, self.budgets, self.run, self.out = space, budgets, run, out
        self.work = out / "candidates"
        self.executor, self.probe_cfg = executor, probe
        self.max_candidates, self.per_round, self.say = max_candidates, per_round, say
        self.state = State(out)
        self.candidates: list[Candidate] = []
        self.errors: list[dict[str, Any]] = []
        self.seen: set[tuple[int, ...]] = set()
        self.clock = _Clock()
        self.on_step = on_step  # the CLI's progress view: "CHILD: compress", "CHILD: tasks", "CHOICE: sensitivities"
        self.probe_seconds = 0.0
        self.num_layers = _num_layers(run.parent_src)
        self._parent = None
        self.tables: Tables | None = None

    # -- verification ------------------------------------------------------------------------

    def _spec(self, alloc: Sequence[int], kind: str):
        settings = self.space.settings(alloc)
        if settings is None:
            return None, None
        tag = (self.space.choices[alloc[0]].label if kind == "uniform" else digest(settings)[:8])
        spec = ChildSpec(name=f"{kind if kind == 'uniform' else 'mix'}-{tag}", steps=[StepSpec(method=self.space.method, settings=settings)])
        return spec, settings

    def _key(self, spec) -> str:
        recipe = self.run.recipe
        return digest({"made_with": made_with(spec, self.run.parent_fp, recipe),
                       "evaluation": recipe.evaluation.model_dump(mode="json"), "device": recipe.device})

    def verify(self, proposals: Sequence[tuple[Sequence[int], str, float | None]]) -> list[Candidate]:
        """Compress and evaluate every proposal not verified before (on this run or an earlier one);
        each is kept in the state file as soon as its round finishes."""
        new, done = [], []
        for alloc, kind, target in proposals:
            alloc = tuple(alloc)
            if alloc in self.seen:
                continue
            self.seen.add(alloc)
            spec, settings = self._spec(alloc, kind)
            if spec is None:
                continue
            key = self._key(spec)
            if key in self.state.candidates:
                c = Candidate(**{**self.state.candidates[key], "allocation": list(alloc)}, reused=True)
                self.say(f"{c.name}: verified in an earlier run ({self.space.describe(alloc)})")
                done.append(self._judge(c))
                continue
            new.append((spec, Candidate(key=key, name=spec.name, kind=kind, allocation=list(alloc), settings=settings,
                                        entry={}, folder=str(self.work / "children" / slug(spec.name)), target=target)))
        groups = [new] if self.executor.name != "local" else [[x] for x in new]  # local: kept one by one
        for group in groups:
            if not group:
                continue
            self.run.children = [s for s, _ in group]
            for _, c in group:
                self.say(f"verifying {c.name}: {self.space.describe(c.allocation)}")
            before, t0 = dict(self.clock.totals), time.perf_counter()
            outcome = recipe_children(self.executor, self.run, self.work, self.say)
            self.clock.close()
            split = self.clock.split(before)
            wall = time.perf_counter() - t0
            by_name = {e["name"]: e for e in outcome.entries}
            for f in outcome.failed:
                self.errors.append({"name": f.get("name"), "reason": f.get("reason")})
                self.say(f"{f.get('name')}: FAILED ({f.get('reason')}); not kept, a re-run tries it again")
            for _, c in group:
                if c.name not in by_name:
                    continue
                c.entry = by_name[c.name]
                c.seconds = ({**split, "wall": round(wall, 3)} if len(group) == 1 else  # a Ray round: its workers' phases
                             {"wall_round": round(wall, 3), "workers_round": (outcome.info or {}).get("worker_seconds")})
                self.state.candidates[c.key] = c.stored()
                done.append(self._judge(c))
            self.state.save()
        return done

    def step(self, message: str) -> None:
        """The evaluator's step hook: timed by the clock, shown by the progress view."""
        self.clock.step(message)
        if self.on_step is not None:
            self.on_step(message)

    def _judge(self, c: Candidate) -> Candidate:
        c.passed, c.verdicts = self.budgets.verdicts(c.entry)
        c.figure = self.budgets.figure(c.entry)
        if self.tables is not None:
            c.damage, c.predicted_size = self.tables.damage(c.allocation), self.tables.size(c.allocation)
        self.candidates.append(c)
        size = c.size(self.space.method)
        self.say(f"{c.name}: {'PASS' if c.passed else 'FAIL'}  size {_mib(size)}  "
                 + ("; ".join(c.verdicts) if c.verdicts else ""))
        return c

    # -- sensitivities -------------------------------------------------------------------------

    def _parent_model(self):
        if self._parent is None:
            from flipcheck.models import load_model  # looked up at call time: tests count models.load_model

            r = self.run.recipe
            self._parent = load_model(self.run.parent_src, device=r.device, dtype=r.dtype, trust_remote_code=r.trust_remote_code)
        return self._parent

    def _probe_ids(self):
        cfg = CalibrationConfig(source=self.probe_cfg["text"], samples=self.probe_cfg["windows"],
                                seq_len=self.probe_cfg["ctx"], seed=self.probe_cfg["seed"])
        return build_calibration(self.run.tokenizer, cfg).input_ids

    def _layer_bits(self, model) -> list[float]:
        """Storage bits of each decoder layer's Linears (nonzero weights only for the pruners)."""
        import torch


        out = []
        for layer in _layers(model):
            bits = 0.0
            for _, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    b, n, zeros, _ = linear_storage(m)
                    bits += b * (1 - zeros / n) if self.space.method in PRUNERS and n else b
            out.append(bits)
        return out

    def sensitivities(self, uniform: Mapping[int, Candidate]) -> Tables:
        """sizes[l][k] and damages[l][k] for every layer l and choice k (module docstring, step 2)."""
        t0 = time.perf_counter()
        ids = None
        probe = {k: self.probe_cfg[k] for k in ("text", "windows", "ctx", "seed")}
        pkey = digest({"parent": self.run.parent_fp, "probe": probe, "method": self.space.method})
        if pkey not in self.state.probes:
            self.state.probes[pkey] = {"sizes": self._layer_bits(self._parent_model())}
            self.state.save()
        parent_bits = self.state.probes[pkey]["sizes"]
        per_choice: dict[int, tuple[list[float], list[float]]] = {}
        for k, choice in enumerate(self.space.choices):
            if choice.keep:
                per_choice[k] = (list(parent_bits), [0.0] * self.num_layers)
                continue
            if self.space.method == "layer_drop":
                key = digest({"parent": self.run.parent_fp, "probe": probe, "skip": True})
            else:
                key = digest({"child": uniform[k].key, "probe": probe})
            if key not in self.state.probes:
                from flipcheck.models import (  # looked up at call time: tests count models.load_model
                    load_model,
                    resolve_source,
                )

                parent = self._parent_model()
                ids = self._probe_ids() if ids is None else ids
                if self.on_step is not None:
                    self.on_step(f"{choice.label}: sensitivities")
                self.say(f"sensitivities of {choice.label}: {self.num_layers} layers swapped into the parent, "
                         f"{ids.shape[0]} windows of {ids.shape[1]} tokens")
                if self.space.method == "layer_drop":
                    sizes = [0.0] * self.num_layers
                    kl = swap_in_kl(parent, {i: SkipLayer() for i in range(self.num_layers)}, ids,
                                    batch_size=self.probe_cfg["batch_size"])
                else:
                    r = self.run.recipe
                    child = load_model(resolve_source(uniform[k].folder), device=r.device, dtype=r.dtype,
                                       trust_remote_code=r.trust_remote_code)
                    _logits(child, ids[:1, :2].to(next(child.parameters()).device))  # unpacks compressed-tensors weights
                    sizes = self._layer_bits(child)
                    kl = swap_in_kl(parent, dict(enumerate(_layers(child))), ids, batch_size=self.probe_cfg["batch_size"])
                    del child
                self.state.probes[key] = {"choice": choice.label, "sizes": sizes,
                                          "damages": [max(0.0, kl[i]) for i in range(self.num_layers)]}
                self.state.save()
            p = self.state.probes[key]
            per_choice[k] = (p["sizes"], p["damages"])
        self._parent = None
        self.probe_seconds += time.perf_counter() - t0
        n = self.num_layers
        return Tables(sizes=[[per_choice[k][0][i] for k in range(len(self.space.choices))] for i in range(n)],
                      damages=[[per_choice[k][1][i] for k in range(len(self.space.choices))] for i in range(n)])

    # -- proposals -----------------------------------------------------------------------------

    def best(self) -> Candidate | None:
        ok = [c for c in self.candidates if c.passed and c.size(self.space.method) is not None]
        return min(ok, key=lambda c: (c.size(self.space.method), c.figure if c.figure is not None else 0.0)) if ok else None

    def _milp(self, d: float) -> tuple[int, ...] | None:
        from flipcheck.decide.allocate import smallest_within

        try:
            return smallest_within(self.tables.sizes, self.tables.damages, d).choice
        except FlipcheckError:
            return None

    def propose(self) -> list[tuple[tuple[int, ...], str, float | None]]:
        """Up to `per_round` new allocations (module docstring, steps 3–4), most compressed first."""
        t = self.tables
        best = self.best()
        cap = t.size(best.allocation) if best is not None else math.inf
        keep = any(c.keep for c in self.space.choices)
        least = float(sum(min(row) for row in t.damages))
        lo, f_lo = (best.damage, best.figure) if best is not None else ((0.0, 0.0) if keep else (least, None))
        fails = [c for c in self.candidates if not c.passed and c.damage is not None and c.damage > lo]
        hi_c = min(fails, key=lambda c: c.damage) if fails else None
        hi = hi_c.damage if hi_c is not None else float(sum(max(row) for row in t.damages))
        f_hi = hi_c.figure if hi_c is not None else None
        goal = self.budgets.primary()
        out: list[tuple[tuple[int, ...], str, float | None]] = []
        first = True
        for _ in range(60):
            if len(out) >= self.per_round or hi - lo <= 1e-12 * max(1.0, hi):
                break
            if hi_c is None and first:
                target = hi  # everything verified passes: try the smallest allocation there is
            elif first and goal is not None and f_lo is not None and f_hi is not None and f_hi > f_lo:
                frac = (goal[1] - f_lo) / (f_hi - f_lo)
                target = lo + min(0.9, max(0.1, frac)) * (hi - lo)
            else:
                target = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
            first = False
            alloc = self._milp(target)
            if alloc is None:
                lo = target
                continue
            if t.size(alloc) >= cap - 1e-9:
                if target >= hi:
                    break  # not even the least constrained allocation is smaller than the best child
                lo = max(lo, target)  # nothing smaller than the best child at this damage: go higher
                continue
            if self.space.settings(alloc) is None:  # no child: the parent itself (go higher) or every layer dropped
                lo, hi = (target, hi) if t.damage(alloc) <= lo + 1e-15 else (lo, target)
                continue
            if alloc in self.seen or alloc in [a for a, _, _ in out]:
                hi = min(hi, t.damage(alloc)) if alloc in self.seen else target  # verified (and failed), or taken
                continue
            out.append((alloc, "milp", target))
            hi = min(hi, t.damage(alloc))  # the next one hedges: safer than this one
        if not out:
            out = self._repairs(cap)
        return out

    def _repairs(self, cap: float) -> list[tuple[tuple[int, ...], str, float | None]]:
        """Greedy repair of failing children smaller than the best one: move the layer with the
        largest damage to the next safer choice, until the allocation is new."""
        t = self.tables
        out = []
        fails = sorted((c for c in self.candidates if not c.passed and t.size(c.allocation) < cap - 1e-9),
                       key=lambda c: -t.size(c.allocation))
        for c in fails:
            alloc = list(c.allocation)
            while True:
                movable = [(t.damages[i][k], i) for i, k in enumerate(alloc)
                           if any(t.damages[i][j] < t.damages[i][k] for j in range(len(self.space.choices)))]
                if not movable:
                    break
                _, i = max(movable)
                k = alloc[i]
                safer = [j for j in range(len(self.space.choices)) if t.damages[i][j] < t.damages[i][k]]
                alloc[i] = max(safer, key=lambda j: (t.damages[i][j], -t.sizes[i][j]))
                a = tuple(alloc)
                if t.size(a) >= cap - 1e-9:
                    break
                if a not in self.seen and self.space.settings(a) is not None:
                    out.append((a, "repair", None))
                    break
            if len(out) >= self.per_round:
                break
        return out

    # -- the whole run -------------------------------------------------------------------------

    def go(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.setup()
        self.explore(self.max_candidates)
        return self.summary(time.perf_counter() - t0)

    def setup(self) -> None:
        """The parent scored, one uniform child per choice verified, the sensitivities measured."""
        self.run.evaluator.on_step = self.step
        self.executor.open(self.work, cache_root(self.run.evaluator), self.say)
        self.run.evaluator.score_parent()
        uniform: dict[int, Candidate] = {}
        if self.space.method != "layer_drop":
            ks = [k for k, c in enumerate(self.space.choices) if not c.keep]
            if len(ks) > self.max_candidates:
                raise FlipcheckError(f"search: {len(ks)} uniform children exceed --max-candidates {self.max_candidates}")
            for c in self.verify([(self.space.uniform(k, self.num_layers), "uniform", None) for k in ks]):
                uniform[c.allocation[0]] = c
            missing = [self.space.choices[k].label for k in ks if k not in uniform]
            if missing:
                raise FlipcheckError(f"search: the uniform child of {', '.join(missing)} failed (see above); "
                                     "its sensitivities cannot be measured")
        self.tables = self.sensitivities(uniform)
        for c in self.candidates:
            c.damage, c.predicted_size = self.tables.damage(c.allocation), self.tables.size(c.allocation)

    def explore(self, cap: int) -> None:
        """Propose and verify (module docstring, steps 3–5) until `cap` candidates in all are verified."""
        while len(self.candidates) + len(self.errors) < cap:
            proposals = self.propose()[: cap - len(self.candidates) - len(self.errors)]
            if not proposals:
                self.say("search: no new allocation can be smaller than the best verified child; done")
                break
            before = len(self.candidates) + len(self.errors)
            self.verify(proposals)
            if len(self.candidates) + len(self.errors) == before:
                break  # nothing new could be verified

    def rejudge(self, budgets: Budgets) -> None:
        """Judge every verified candidate anew by other budgets (the frontier's next one)."""
        self.budgets = budgets
        for c in self.candidates:
            c.passed, c.verdicts = budgets.verdicts(c.entry)
            c.figure = budgets.figure(c.entry)

    def summary(self, wall: float) -> dict[str, Any]:
        method = self.space.method
        best = self.best()
        uniform_ok = [c for c in self.candidates if c.kind == "uniform" and c.passed]
        best_uniform = min(uniform_ok, key=lambda c: c.size(method)) if uniform_ok else None
        front = pareto([(c.size(method), c.figure) for c in self.candidates])
        rows = []
        for i, c in enumerate(self.candidates):
            rep = c.report
            rows.append({
                "name": c.name, "kind": c.kind, "key": c.key, "winner": best is not None and c.name == best.name,
                "passed": c.passed, "verdicts": c.verdicts, "pareto": i in front, "reused": c.reused,
                "allocation": [self.space.choices[k].label for k in c.allocation],
                "allocation_summary": self.space.describe(c.allocation), "settings": c.settings,
                "size_bits": c.size(method), "bits_per_weight": rep.get("bits_per_weight"), "sparsity": rep.get("sparsity"),
                "parameters": rep.get("parameters"), "figure": c.figure, "damage": c.damage, "target": c.target,
                "predicted_size_bits": c.predicted_size, "folder": c.folder, "seconds": c.seconds,
                "tasks": {t: _task_figures(s) for t, s in (c.entry.get("tasks") or {}).items()},
                "micro": _task_figures(c.entry["micro"]) if c.entry.get("micro") else None,
                "corpus": {n: {"kl": (f.get("kl") or {}).get("mean"), "ppl_parent": f.get("ppl_parent"),
                               "ppl_child": f.get("ppl_child")} for n, f in (c.entry.get("corpus") or {}).items()},
            })
        new = [c for c in self.candidates if not c.reused]
        primary = self.budgets.primary()
        return {
            "parent": self.run.parent_src.ref, "method": method, "key": self.space.key, "choices": self.space.labels(),
            "fixed": self.space.fixed, "budgets": {k: v for k, v in self.budgets.values.items() if v is not None},
            "confidence": self.budgets.confidence, "metric": self.budgets.metric,
            "figure": primary[0] if primary else None, "figure_budget": primary[1] if primary else None,
            "tasks": list(self.run.recipe.evaluation.tasks), "texts": list(self.run.recipe.evaluation.texts),
            "limit": self.run.recipe.evaluation.limit, "probe": self.probe_cfg, "layers": self.num_layers,
            "sensitivities": {"sizes": self.tables.sizes, "damages": self.tables.damages} if self.tables else None,
            "candidates": rows, "failed": self.errors,
            "winner": best.name if best else None,
            "best_uniform": best_uniform.name if best_uniform else None,
            "cost": {"candidates": len(self.candidates), "new": len(new), "reused": len(self.candidates) - len(new),
                     "wall_s": round(wall, 3), "probe_s": round(self.probe_seconds, 3),
                     "compress_s": round(sum(c.seconds.get("compress", 0.0) for c in new), 3),
                     "evaluate_s": round(sum(c.seconds.get("evaluate", 0.0) for c in new), 3),
                     "executor": self.executor.name},
        }


def _task_figures(s: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("n", "flips", "n_c2i", "n_i2c", "acc_P", "acc_C", "delta_acc", "metric")
    out = {k: s.get(k) for k in keys}
    out["kl"] = (s.get("kl_options") or {}).get("mean")
    return out


def pareto(points: Sequence[tuple[float | None, float | None]]) -> set[int]:
    """Indices of the points no other point beats on both size and figure (lower is better)."""
    ok = [(i, s, f) for i, (s, f) in enumerate(points) if s is not None and f is not None]
    front = set()
    for i, s, f in ok:
        if not any((s2 <= s and f2 <= f) and (s2 < s or f2 < f) for j, s2, f2 in ok if j != i):
            front.add(i)
    return front


def _mib(bits: float | None) -> str:
    return "n/a" if bits is None else f"{bits / 8 / 2**20:.2f} MiB"


def _num_layers(src) -> int:
    cfg = parent_config(src) or {}
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if not n:
        raise FlipcheckError(f"search: cannot read num_hidden_layers from {src.spec}'s config.json")
    return int(n)
