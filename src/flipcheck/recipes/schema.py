"""Recipes: a YAML file naming the parent, calibration, compression steps, tasks and gate budgets.

```yaml
name: wanda-then-gptq
parent: demo                       # hub id, folder, or `demo` (the offline demo parent)
calibration: {source: demo, samples: 32, seq_len: 256}
evaluation: {tasks: [flipcheck_demo_facts, flipcheck_demo_letters], limit: 200}
children:                          # each child is an ordered list of steps
  - name: wanda24-gptq4
    steps:
      - {method: wanda, settings: {mask: "2:4"}}
      - {method: gptq, settings: {scheme: W4A16}}
sweeps:                            # one child per grid value, parent evaluated once
  - {method: noise, grid: {sigma: [0.02, 0.05, 0.1]}}
gate: {max_flips: 5%, max_kl: 0.05, min_acc_delta: -2%}
```

The schema maps 1:1 onto the method configs: every step's settings and every grid value are
validated by the method's own config model when the recipe loads, and errors name the line.
"""

from __future__ import annotations

import itertools
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.registry import check_chain, make_config
from flipcheck.errors import FlipcheckError, suggest
from flipcheck.evaluation.options import ModelOptions, ScoreOptions, one_line
from flipcheck.gate import parse_budget
from flipcheck.gate_generations import parse_length_ratio, parse_survival
from flipcheck.judge.client import JudgeSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(_Strict):
    """One compression step: a registered method and its settings."""

    method: str
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> StepSpec:
        make_config(self.method, self.settings)  # raises FlipcheckError naming the setting
        return self

    def config(self):
        return make_config(self.method, self.settings)


class ChildSpec(_Strict):
    """A child: a name and the ordered steps that make it from the parent."""

    name: str
    steps: list[StepSpec] = Field(min_length=1)
    strength: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chain(self) -> ChildSpec:
        check_chain([s.method for s in self.steps])  # raises FlipcheckError naming the pair
        return self


class SweepSpec(_Strict):
    """One method at several strengths: a child per point of the grid (cartesian product)."""

    method: str
    grid: dict[str, list[Any]] = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict, description="fixed settings for every point")
    name: str | None = None

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, v in grid.items():
            if not v:
                raise ValueError(f"grid {k!r} has no values")
        return grid

    @model_validator(mode="after")
    def _valid_points(self) -> SweepSpec:
        for point in self.points():
            StepSpec(method=self.method, settings={**self.settings, **point})
        return self

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(self.grid[k] for k in keys))]

    def children(self) -> list[ChildSpec]:
        prefix = self.name or self.method
        out = []
        for point in self.points():
            step = StepSpec(method=self.method, settings={**self.settings, **point})
            validated = step.config().model_dump(mode="json")
            strength = {k: validated[k] for k in point}  # typed values ("0.1" from a CLI -> 0.1)
            label = ",".join(f"{k}={v}" for k, v in strength.items())
            out.append(ChildSpec(name=f"{prefix} {label}", steps=[step], strength=strength))
        return out


class EvaluationSpec(ScoreOptions):
    """Which lm-eval tasks, and how they are scored: the options of ``flipcheck eval``
    (:class:`~flipcheck.evaluation.options.ScoreOptions`, declared there once) plus the tasks."""

    tasks: list[str] = Field(default_factory=lambda: ["flipcheck_demo_facts", "flipcheck_demo_letters"])
    doc_ids: dict[str, list[int]] | None = None  # only these doc ids per leaf task (set by search's splits)

    @model_validator(mode="after")
    def _tasks_or_texts(self) -> EvaluationSpec:
        if not self.tasks and not self.texts:
            raise ValueError("give at least one task (tasks) or text corpus (texts)")
        return self


class GateSpec(_Strict):
    """Budgets a child must meet; strings like '2%' or numbers like 0.02."""

    max_flips: str | float | None = None
    max_kl: str | float | None = None
    min_acc_delta: str | float | None = None
    min_acc: str | float | None = None
    max_kl_text: str | float | None = None  # mean KL(P||C) over every scored token of each text corpus
    max_ppl_ratio: str | float | None = None  # PPL_C / PPL_P on each text corpus, e.g. 1.05
    over_floor: bool = False  # flips and KL budgets judge the excess over the noise floor
    min_judge_delta: str | float | None = None  # smallest allowed judged score change (points of 1-10), e.g. -0.5
    confidence: str | float | None = None  # judge flips / Δacc by one-sided bounds at this level, e.g. 0.95
    min_survival: str | None = None  # T:SHARE, generations identical to the parent's through T tokens, e.g. 128:90%
    max_length_ratio: str | float | None = None  # median generated tokens child / parent, e.g. 1.1

    @model_validator(mode="after")
    def _parse(self) -> GateSpec:
        from flipcheck.evaluation.confidence import check_confidence

        if self.confidence is not None:
            check_confidence(self.confidence, "gate.confidence")

        for name in ("max_flips", "max_kl", "min_acc_delta", "min_acc", "max_kl_text", "max_ppl_ratio", "min_judge_delta"):
            v = getattr(self, name)
            if v is not None:
                parse_budget(str(v), name)

        parse_survival(self.min_survival, "gate.min_survival")
        parse_length_ratio(self.max_length_ratio, "gate.max_length_ratio")
        return self

    def budgets(self) -> dict[str, str | bool | None]:
        return {k: (v if isinstance(v, bool) else None if v is None else str(v)) for k, v in self.model_dump().items()}


class JudgeSpec(_Strict):
    """Free-form answers of parent and every child graded by an LLM judge (flipcheck judge; see flipcheck.judge)."""

    prompts: str = "demo"  # JSONL file (flipcheck's or MT-Bench's question.jsonl), hf:NAME[:CONFIG[:SPLIT]], or demo
    url: str  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    model: str  # the judge model the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from the recipe
    mode: Literal["single", "pairwise", "both"] = "both"
    max_new_tokens: int = Field(256, ge=1)  # per answer turn of parent and children (greedy)
    max_tokens: int = Field(512, ge=1)  # per judge reply
    concurrency: int = Field(4, ge=1)
    limit: int | None = Field(None, ge=1)  # the first N prompts

    @model_validator(mode="after")
    def _valid(self) -> JudgeSpec:
        self.settings()  # a bad URL fails when the recipe loads
        return self

    def settings(self):
        return JudgeSettings(url=self.url, model=self.model, api_key_env=self.api_key_env, max_tokens=self.max_tokens,
                             concurrency=self.concurrency)


class Recipe(_Strict, ModelOptions):
    """A whole run: parent, calibration, children (steps and/or sweeps), evaluation, gate."""

    name: str = "recipe"
    description: str = ""
    parent: str = "demo"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[StepSpec] | None = None
    children: list[ChildSpec] | None = None
    sweeps: list[SweepSpec] | None = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gate: GateSpec | None = None
    judge: JudgeSpec | None = None
    # device, dtype and trust_remote_code: how every model of the recipe loads (ModelOptions)

    @model_validator(mode="after")
    def _has_children(self) -> Recipe:
        if not (self.steps or self.children or self.sweeps):
            raise ValueError("a recipe needs `steps`, `children` or `sweeps`")
        names = [c.name for c in self.all_children()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"child names must be unique; repeated: {', '.join(sorted(dup))}")
        return self

    def all_children(self) -> list[ChildSpec]:
        out: list[ChildSpec] = []
        if self.steps:
            out.append(ChildSpec(name=self.name, steps=self.steps))
        out.extend(self.children or [])
        for s in self.sweeps or []:
            out.extend(s.children())
        return out


# -- loading with line numbers ---------------------------------------------------------------------


def _line_of(node: yaml.Node | None, loc: tuple, *, key_line: bool = False) -> int | None:
    """Line (1-based) of the YAML node at pydantic location `loc`, as deep as it resolves
    (with `key_line`, the line of the last key itself rather than of its value)."""
    line = node.start_mark.line + 1 if node is not None else None
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if nxt is None or (key_line and i == len(loc) - 1):
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def parse_recipe(text: str, origin: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; errors read `origin:LINE: what is wrong`."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark else origin
        raise FlipcheckError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(data, dict):
        raise FlipcheckError(f"{origin}: a recipe is a YAML mapping (name:, parent:, steps:/children:/sweeps:, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        # an unknown key first: a typo (`stepz:`) also makes its real key missing, and the typo is the news
        e = min(err.errors(), key=lambda x: x["type"] != "extra_forbidden")
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        line = _line_of(node, loc, key_line=e["type"] == "extra_forbidden")
        path = ".".join(str(x) for x in loc) or "(recipe)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key {loc[-1]!r}" + (f"; allowed: {', '.join(allowed)}." + suggest(str(loc[-1]), allowed) if allowed else "")
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise FlipcheckError(f"{origin}:{line}: {path}: {msg}{more}") from err


def _allowed_keys(parent_loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in parent_loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        for a in args:
            cand += [x for x in getattr(a, "__args__", ()) if isinstance(x, type) and issubclass(x, BaseModel)]
        if not cand:
            return []
        model = cand[0]
    return list(getattr(model, "model_fields", {}))


def bundled_dir() -> Path:
    return Path(str(resources.files("flipcheck.recipes")))


def bundled_recipes() -> dict[str, str]:
    """Name -> one-line description of every recipe shipped with flipcheck."""
    out = {}
    for p in sorted(bundled_dir().glob("*.yaml")):
        data = yaml.safe_load(p.read_text()) or {}
        out[p.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def load_recipe(path_or_name: str | os.PathLike) -> Recipe:
    """Load a recipe from a YAML file, or a bundled recipe by name (`paper-quant`)."""
    p = Path(path_or_name)
    if p.is_file():
        return parse_recipe(p.read_text(), str(p))
    bundled = bundled_dir() / f"{path_or_name}.yaml"
    if bundled.is_file():
        return parse_recipe(bundled.read_text(), f"{path_or_name} (bundled)")
    names = list(bundled_recipes())
    raise FlipcheckError(
        f"recipe {str(path_or_name)!r} is neither a file nor a bundled recipe; bundled: {', '.join(names)}."
        + suggest(str(path_or_name), names)
    )


def dump_recipe(recipe: Recipe) -> str:
    """YAML text that loads back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def with_overrides(recipe: Recipe, options: dict[str, Any], *, parent: str | None = None,
                   calibration: str | None = None) -> Recipe:
    """`recipe` with the evaluation options a command gave (`options`: fields of
    :class:`~flipcheck.evaluation.options.EvalOptions` and ``tasks``; the loading ones go to the recipe's
    top level), and its parent and calibration source where given; the result checked whole (one line)."""
    data = recipe.model_dump()
    top = {k: v for k, v in options.items() if k in ModelOptions.model_fields}
    data["evaluation"] = {**data["evaluation"], **{k: v for k, v in options.items() if k not in top}}
    data.update(top)
    if parent:
        data["parent"] = parent
    if calibration:
        data["calibration"] = {**data["calibration"], "source": calibration}
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise one_line(f"recipe {recipe.name}", err) from None
