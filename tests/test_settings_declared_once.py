"""The evaluation settings are declared once (EvalSettings); every other place that takes them is checked
against that declaration here, so a setting added in one place and forgotten in another fails."""

from __future__ import annotations

import dataclasses
import inspect

from flipcheck.cli import app
from flipcheck.evaluation.runner import EvalSettings
from flipcheck.orchestrate.evaluate import evaluate
from flipcheck.orchestrate.recipe import sweep
from flipcheck.recipes.schema import EvaluationSpec

DECLARED = {f.name for f in dataclasses.fields(EvalSettings)}
# not user options: the bootstrap size and the parent's stored top-K are library-level knobs; the doc ids
# of a split (doc_ids) are chosen by search, and a recipe can hold them
LIBRARY_ONLY = {"n_boot", "topk", "doc_ids"}
# where a recipe holds them: device, dtype and trust_remote_code are recipe-level keys, not evaluation's
RECIPE_LEVEL = {"device", "dtype", "trust_remote_code"}
# names that differ on the command line
CLI_NAMES = {"texts": "text", "filter": "filter_"}


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _cli_params(name: str) -> set[str]:
    cmd = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name)
    return _params(cmd.callback)


def test_evaluate_takes_every_setting():
    assert DECLARED - LIBRARY_ONLY - {"tasks"} <= _params(evaluate) | {"texts"}
    assert "texts" in _params(evaluate) and "tasks" in _params(evaluate)


def test_sweep_takes_every_setting_but_trust_remote_code():
    missing = DECLARED - LIBRARY_ONLY - _params(sweep) - {"trust_remote_code"}
    assert not missing, missing


def test_the_recipe_evaluation_section_declares_every_setting():
    fields = set(EvaluationSpec.model_fields)
    missing = DECLARED - LIBRARY_ONLY - RECIPE_LEVEL - fields
    assert not missing, missing
    # and nothing evaluation-only that the evaluator would not receive (noise_floor is the run's, not a score setting)
    assert fields - DECLARED <= {"noise_floor"}


def test_eval_and_sweep_commands_offer_every_setting():
    for command in ("eval", "sweep"):
        params = _cli_params(command)
        wanted = {CLI_NAMES.get(n, n) for n in DECLARED - LIBRARY_ONLY}
        if command == "sweep":
            wanted -= {"trust_remote_code"}
        missing = wanted - params
        assert not missing, (command, missing)


def test_recipe_settings_are_derived_by_name(tmp_path):
    """RecipeRun's EvalSettings come from the evaluation section field by field (no hand-written list)."""
    from flipcheck.recipes.runner import eval_settings
    from flipcheck.recipes.schema import Recipe

    spec = {"tasks": ["a"], "kl": "exact", "ctx": 64, "scoring": "half", "metric": "acc", "per_subtask": True,
            "engine": "llama.cpp", "child_engine": "transformers", "engine_floor": True, "limit": 5, "seed": 7}
    recipe = Recipe(name="x", parent="demo", evaluation=spec, children=[{"name": "n", "steps": [{"method": "noise"}]}],
                    device="cpu", dtype="float32")
    s = eval_settings(recipe)
    for key, value in spec.items():
        assert getattr(s, key) == value, key
    assert (s.device, s.dtype) == ("cpu", "float32")


def test_batch_size_auto_is_resolved_recorded_and_changes_no_answer(tiny_model_dir, task_dir, tmp_path):
    from flipcheck.compressors.pipeline import compress

    child = tmp_path / "noisy"
    compress(str(tiny_model_dir), [("noise", {"sigma": 0.1})], out=child)
    runs = {}
    for bs in ("auto", 3):
        runs[bs] = evaluate(str(tiny_model_dir), str(child), tasks="tiny_letters,tiny_sums", include_path=str(task_dir),
                            batch_size=bs, cache_dir=tmp_path / f"cache{bs}")
    auto = runs["auto"]["settings"]
    assert auto["batch_size_auto"] is True and auto["batch_size"] == 16  # CPU: flipcheck's default
    a, b = (runs[k]["children"][0]["micro"] for k in ("auto", 3))
    assert (a["acc_P"], a["acc_C"], a["flips"]) == (b["acc_P"], b["acc_C"], b["flips"])


def test_a_bad_batch_size_is_one_line():
    import pytest

    from flipcheck.errors import FlipcheckError

    with pytest.raises(FlipcheckError, match="allowed are an integer >= 1 or auto"):
        EvalSettings(tasks=["x"], batch_size="big")


# A value other than the default for every setting (the test fails when a setting is added without one).
OTHER = {"tasks": ["tiny_sums"], "include_path": "elsewhere", "num_fewshot": 2, "limit": 7, "seed": 9, "batch_size": 3,
         "topk": 64, "device": "meta", "dtype": "bfloat16", "trust_remote_code": True, "n_boot": 200, "metric": "acc",
         "filter": "strict-match", "per_subtask": True, "kl": "exact", "texts": ["a.txt"], "ctx": 64, "scoring": "half",
         "engine": "llama.cpp", "parent_engine": "transformers", "child_engine": "vllm", "engine_floor": True,
         "sample": "temperature=0.7", "samples": 2, "doc_ids": {"tiny_sums": [1, 2]}}


def test_every_accepted_setting_reaches_the_cache_key_or_the_report(tmp_path):
    """A setting that is accepted and then dropped would change neither what keys the results nor what
    the report says was run: each one, changed alone, must change one of them."""
    assert set(OTHER) == DECLARED, set(OTHER) ^ DECLARED
    (tmp_path / "t.yaml").write_text("task: t\n")
    OTHER["include_path"] = str(tmp_path)
    base = EvalSettings(tasks=["tiny_letters"])
    base_key, base_public = base.key_fields(), base.public()
    for name, value in OTHER.items():
        if name == "device":  # this CPU machine has one device; the report names the resolved one
            assert base_public["device"] == "cpu" and base_key["device_kind"] == "cpu"
            continue
        start = base if name != "samples" else dataclasses.replace(base, sample="temperature=0.7")  # needs --sample
        changed = dataclasses.replace(start, **{name: value})
        assert changed.key_fields() != start.key_fields() or changed.public() != start.public(), \
            f"{name} reaches neither the cache key nor the report"


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}


def test_every_setting_has_one_default_everywhere_it_is_declared():
    """The dataclass, the recipe section, evaluate(), sweep(), search() and the eval/sweep/search
    commands agree on each default (the CLI spells batch_size as text and collections as None)."""
    from flipcheck.decide.search import search

    declared = {}
    for f in dataclasses.fields(EvalSettings):
        if f.default is not dataclasses.MISSING:
            declared[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            declared[f.name] = f.default_factory()
    spec = {n: f.get_default(call_default_factory=True) for n, f in EvaluationSpec.model_fields.items()}
    places = {"recipe": spec, "evaluate": _defaults(evaluate), "sweep": _defaults(sweep), "search": _defaults(search)}
    for command in ("eval", "sweep", "search"):
        cmd = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
        places[f"cli {command}"] = {next((k for k, v in CLI_NAMES.items() if v == n), n): p
                                    for n, p in _defaults(cmd.callback).items()}

    def same(a, b) -> bool:
        if isinstance(a, (list, tuple)) and not a:  # an empty collection: None or () elsewhere
            return b in (None, (), [])
        return a == b or str(a) == str(b)  # --batch-size is text on the command line

    for name, default in declared.items():
        if name == "tasks":
            continue  # required by evaluate/eval; sweep, search and recipes default to the demo tasks
        for where, values in places.items():
            if name in values:
                assert same(default, values[name]), (name, where, default, values[name])
