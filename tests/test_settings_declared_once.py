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
