"""Recipes and sweeps end to end: parent scored once, resume after interruption, bundled recipes."""

from __future__ import annotations

import json

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import runner
from flipcheck.models import save_model
from flipcheck.recipes.schema import load_recipe
from flipcheck.sweep import run_recipe, sweep

TASKS = ["tiny_letters", "tiny_sentences"]


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("sweep") / "parent"
    save_model(tiny_model, tiny_tokenizer, out, {"parent": None})
    return out


@pytest.fixture(scope="module")
def parent4_dir(tmp_path_factory, tiny_tokenizer):
    """A 4-layer parent (the bundled layer-drop recipe drops up to 2 layers, as on the demo parent)."""
    from flipcheck.tiny import build_llama

    out = tmp_path_factory.mktemp("sweep4") / "parent"
    save_model(build_llama(len(tiny_tokenizer), num_hidden_layers=4, seed=1), tiny_tokenizer, out, {"parent": None})
    return out


def _count_lm_eval(monkeypatch):
    calls: list[str] = []
    real = runner._lm_eval_samples

    def spy(lm, unit, settings):
        calls.append(unit)
        return real(lm, unit, settings)

    monkeypatch.setattr(runner, "_lm_eval_samples", spy)
    return calls


def test_sweep_scores_the_parent_once_and_resumes(parent_dir, task_dir, tmp_path, monkeypatch):
    calls = _count_lm_eval(monkeypatch)
    grid = {"sigma": [0.05, 0.1, 0.2]}
    kwargs = dict(tasks=TASKS, include_path=str(task_dir), out=tmp_path / "run", cache_dir=tmp_path / "cache", batch_size=8)
    report = sweep(str(parent_dir), "noise", grid, **kwargs)
    # first child: lock-step + parent replay per task; the other two: the child only
    assert len(calls) == len(TASKS) * (len(grid["sigma"]) + 1)
    assert [c["strength"] for c in report["children"]] == [{"sigma": 0.05}, {"sigma": 0.1}, {"sigma": 0.2}]
    assert all(c["tasks"]["tiny_letters"]["acc_P"] == report["children"][0]["tasks"]["tiny_letters"]["acc_P"]
               for c in report["children"])
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [c["name"] for c in on_disk["children"]] == ["noise sigma=0.05", "noise sigma=0.1", "noise sigma=0.2"]

    # interrupt a bigger sweep while its third point is being evaluated
    from flipcheck.evaluation.runner import Evaluator

    real_eval = Evaluator.evaluate_child
    seen: list[str] = []

    def stop_at_third(self, child, **kw):
        seen.append(child.name)
        if child.name == "noise sigma=0.3":
            raise KeyboardInterrupt
        return real_eval(self, child, **kw)

    monkeypatch.setattr(Evaluator, "evaluate_child", stop_at_third)
    bigger = {"sigma": [0.05, 0.1, 0.3]}
    kwargs["out"] = tmp_path / "run2"
    with pytest.raises(KeyboardInterrupt):
        sweep(str(parent_dir), "noise", bigger, **kwargs)
    partial = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert [c["name"] for c in partial["children"]] == ["noise sigma=0.05", "noise sigma=0.1"]  # kept

    monkeypatch.setattr(Evaluator, "evaluate_child", real_eval)
    calls.clear()
    from flipcheck.compressors import registry

    applied: list[str] = []
    real_apply = registry.get_method("noise").apply
    monkeypatch.setitem(
        registry._METHODS, "noise",
        registry.Method("noise", registry._METHODS["noise"].config_cls,
                        lambda m, c, cal: applied.append(c.sigma) or real_apply(m, c, cal), False, "noise"),
    )
    report = sweep(str(parent_dir), "noise", bigger, **kwargs)
    # the interrupted point's child had been saved before its evaluation stopped: nothing is
    # compressed again, and only that child is scored (against the cached parent)
    assert applied == []
    assert calls == TASKS
    assert len(report["children"]) == 3


def test_slicegpt_sweep_computes_rotations_once(parent_dir, task_dir, tmp_path, monkeypatch):
    from flipcheck.compressors import slicegpt

    count = []
    real = slicegpt.pca_rotations
    monkeypatch.setattr(slicegpt, "pca_rotations", lambda *a, **k: count.append(1) or real(*a, **k))
    report = sweep(
        str(parent_dir), "slicegpt", {"slicing": [0.1, 0.25]}, tasks=["tiny_letters"], include_path=str(task_dir),
        out=tmp_path / "run", cache_dir=tmp_path / "cache", calibration={"samples": 4, "seq_len": 32}, batch_size=8,
    )
    assert len(count) == 1
    params = [c["compression"][0]["parameters"] for c in report["children"]]
    assert params[0] > params[1]


def test_grid_value_out_of_range_fails_before_any_work(parent_dir, tmp_path):
    with pytest.raises(FlipcheckError, match="sigma"):
        sweep(str(parent_dir), "noise", {"sigma": ["0.1", "-1"]}, tasks=TASKS, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["paper-noise", "paper-layer-drop", "wanda-gptq"])
def test_quick_bundled_recipes_run_end_to_end(name, parent4_dir, task_dir, tmp_path):
    recipe = load_recipe(name)
    recipe = recipe.model_copy(
        update={
            "parent": str(parent4_dir),
            "calibration": recipe.calibration.model_copy(update={"samples": 4, "seq_len": 32}),
            "evaluation": recipe.evaluation.model_copy(
                update={"tasks": ["tiny_letters"], "include_path": str(task_dir), "batch_size": 8}
            ),
        }
    )
    report = run_recipe(recipe, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert len(report["children"]) == len(recipe.all_children())
    for child in report["children"]:
        assert child["tasks"]["tiny_letters"]["n"] == 20
        folder = tmp_path / "run" / "children"
        assert any(p.is_dir() for p in folder.iterdir())
    assert (tmp_path / "run" / "report.html").is_file()
