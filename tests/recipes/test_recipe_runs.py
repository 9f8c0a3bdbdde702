"""Recipes and sweeps end to end: parent scored once, resume after interruption, bundled recipes."""

from __future__ import annotations

import json

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import runner
from flipcheck.models import save_model
from flipcheck.orchestrate.recipe import run_recipe, sweep
from flipcheck.recipes.schema import load_recipe

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


@pytest.fixture(scope="module")
def cal_text(tmp_path_factory):
    """A local calibration file: a parent that is not the demo has no offline default text."""
    from conftest import corpus

    path = tmp_path_factory.mktemp("cal") / "calibration.txt"
    path.write_text("\n\n".join(corpus() * 3))
    return path


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
    # per task: the parent alone once, then each child against its cached results
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


def test_slicegpt_sweep_computes_rotations_once(parent_dir, task_dir, tmp_path, monkeypatch, cal_text):
    from flipcheck.compressors import slicegpt

    count = []
    real = slicegpt.pca_rotations
    monkeypatch.setattr(slicegpt, "pca_rotations", lambda *a, **k: count.append(1) or real(*a, **k))
    report = sweep(
        str(parent_dir), "slicegpt", {"slicing": [0.1, 0.25]}, tasks=["tiny_letters"], include_path=str(task_dir),
        out=tmp_path / "run", cache_dir=tmp_path / "cache", batch_size=8, settings={"pca": "parent"},
        calibration={"source": str(cal_text), "samples": 4, "seq_len": 32},
    )
    assert len(count) == 1
    params = [c["compression"][0]["parameters"] for c in report["children"]]
    assert params[0] > params[1]


def test_grid_value_out_of_range_fails_before_any_work(parent_dir, tmp_path):
    with pytest.raises(FlipcheckError, match="sigma"):
        sweep(str(parent_dir), "noise", {"sigma": ["0.1", "-1"]}, tasks=TASKS, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["paper-noise", "paper-layer-drop", "wanda-gptq"])
def test_quick_bundled_recipes_run_end_to_end(name, parent4_dir, task_dir, tmp_path, cal_text):
    recipe = load_recipe(name)
    recipe = recipe.model_copy(
        update={
            "parent": str(parent4_dir),
            "calibration": recipe.calibration.model_copy(update={"source": str(cal_text), "samples": 4, "seq_len": 32}),
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


def test_sweep_reloads_the_parent_and_never_copies_a_model(parent_dir, task_dir, tmp_path, monkeypatch, cal_text):
    """Each child starts from the parent's files, not a deepcopy of the parent in memory; the first
    step's statistics are memoised by the parent's fingerprint without hashing any weights."""
    import torch

    from flipcheck import models
    from flipcheck.compressors import layer_drop
    from flipcheck.recipes import runner as sweep_mod

    def no_copy(self, memo):
        raise AssertionError("a model was deep-copied")

    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", no_copy, raising=False)
    loads, distances = [], []
    real_load, real_dist = sweep_mod.load_model, layer_drop.angular_distances
    for mod in (sweep_mod, models):  # children load in the recipe runner, the parent through its engine's open
        monkeypatch.setattr(mod, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(layer_drop, "angular_distances", lambda *a, **k: distances.append(1) or real_dist(*a, **k))
    hashed, real_fp = [], models.fingerprint
    monkeypatch.setattr(models, "fingerprint", lambda m: hashed.append(1) or real_fp(m))
    report = sweep(
        str(parent_dir), "layer_drop", {"n": [0, 1]}, settings={"selection": "angular"}, tasks=["tiny_letters"],
        include_path=str(task_dir), out=tmp_path / "run", cache_dir=tmp_path / "cache", batch_size=8,
        calibration={"source": str(cal_text), "samples": 4, "seq_len": 32},
    )
    assert len(report["children"]) == 2
    assert len(loads) == 3  # the parent, then one fresh parent per child
    assert len(distances) == 1  # n=0 drops nothing; n=1 computes the distances once
    assert hashed == []  # saved children are fingerprinted from their files; the memo key hashed nothing


def test_a_finished_child_is_reused_only_if_everything_that_made_it_is_equal(parent_dir, task_dir, tmp_path, cal_text):
    """Same parent and steps but another calibration (seq_len, or the local file's content): rebuilt."""
    cal = tmp_path / "cal.txt"
    cal.write_text(cal_text.read_text())
    said: list[str] = []

    def run(seq_len: int) -> None:
        said.clear()
        sweep(
            str(parent_dir), "wanda", {"sparsity": [0.3]}, tasks=["tiny_letters"], include_path=str(task_dir), limit=4,
            out=tmp_path / "run", cache_dir=tmp_path / "cache", batch_size=8, progress=said.append,
            calibration={"source": str(cal), "samples": 2, "seq_len": seq_len},
        )

    reused = "wanda sparsity=0.3: compressed in an earlier run"
    run(32)
    made = json.loads((tmp_path / "run" / "children" / "wanda_sparsity=0.3" / "flipcheck.json").read_text())["made_with"]
    assert made["calibration"]["seq_len"] == 32 and made["calibration"]["content"] and made["dtype"] == "torch.float32"
    run(32)
    assert any(reused in m for m in said)
    run(48)
    assert not any(reused in m for m in said)  # seq_len changed: compressed again
    from flipcheck.recipes.runner import made_with
    from flipcheck.recipes.schema import Recipe

    recipe = Recipe(parent=str(parent_dir), calibration={"source": str(cal)}, sweeps=[{"method": "wanda", "grid": {"sparsity": [0.3]}}])
    before = made_with(recipe.all_children()[0], "fp", recipe)
    cal.write_text(cal.read_text() + "\n\nThe goat saw a purple ball.")
    assert made_with(recipe.all_children()[0], "fp", recipe) != before  # the file's content is part of it
