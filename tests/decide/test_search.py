"""search: end to end on a 4-layer tiny Llama and the tiny tasks. The winner meets its budget on a
real evaluation, every candidate's figures are what `flipcheck eval` of its child gives, the winner
is no larger than the smallest uniform child that passes, recipe.yaml runs, a second run verifies
nothing anew, and bad input is one line with exit 2."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.decide.search_space import parse_space, ranges
from flipcheck.errors import FlipcheckError

TASKS = "tiny_letters,tiny_sentences"
BUDGET = "4%"  # uniform W4A16 flips 5 % of tiny_sentences here, W8A16 none: the search must mix


@pytest.fixture(scope="module")
def parent4(tmp_path_factory, tiny_tokenizer):
    """A random 4-layer tiny Llama saved as a folder (the session's tiny model has 2 layers)."""
    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama

    out = tmp_path_factory.mktemp("search_parent") / "parent"
    save_model(build_llama(len(tiny_tokenizer), seed=0, num_hidden_layers=4), tiny_tokenizer, out, {"parent": None})
    return out


def _args(parent, task_dir, out, cache, *extra):
    return ["search", str(parent), "--method", "rtn", "--choices", "scheme=W4A16,W8A16", "--max-flips", BUDGET,
            "--tasks", TASKS, "--include-path", str(task_dir), "--out", str(out), "--cache-dir", str(cache),
            "--calibration", "demo", "--probe-windows", "2", "--probe-ctx", "32", "--batch-size", "8", "--no-confirm", *extra]


@pytest.fixture(scope="module")
def searched(parent4, task_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    res = CliRunner().invoke(app, _args(parent4, task_dir, root / "run", root / "cache"))
    assert res.exit_code == 0, res.output
    return root, json.loads((root / "run" / "report.json").read_text())["search"], res.output


def test_search_output_off_a_terminal_has_every_figure_whole(searched):
    assert "…" not in searched[2]  # CliRunner's output is not a terminal: rich used to cut it to 80 columns


def test_winner_meets_the_budget_and_beats_the_smallest_passing_uniform(searched):
    root, block, output = searched
    by = {c["name"]: c for c in block["candidates"]}
    winner = by[block["winner"]]
    assert winner["passed"] and all(v.startswith("PASS") for v in winner["verdicts"])
    for t in winner["tasks"].values():
        assert t["flips"] <= 0.04 + 1e-12
    uniform = {c["allocation_summary"]: c for c in block["candidates"] if c["kind"] == "uniform"}
    assert not uniform["W4A16 ×4"]["passed"] and uniform["W8A16 ×4"]["passed"]  # the budget needs a mix
    assert block["best_uniform"] == uniform["W8A16 ×4"]["name"]
    assert winner["size_bits"] < uniform["W8A16 ×4"]["size_bits"]
    assert winner["kind"] in ("milp", "repair") and set(winner["allocation"]) == {"W4A16", "W8A16"}
    # the smallest verified child that passes, and no candidate beyond the bound
    assert winner["size_bits"] == min(c["size_bits"] for c in block["candidates"] if c["passed"])
    assert 3 <= block["cost"]["candidates"] <= 8 and block["cost"]["new"] == block["cost"]["candidates"]
    assert winner["pareto"] and "winner" in output and (root / "run" / "report.html").read_text().count("base64") == 1
    assert block["cost"]["compress_s"] > 0 and block["cost"]["evaluate_s"] > 0


def test_every_candidate_is_what_flipcheck_eval_gives_and_its_size_is_measured(searched, parent4, task_dir):
    """Re-evaluating each candidate's child through `evaluate` (flipcheck eval) gives equal figures;
    the reported size is stats.measure's storage bits of the child loaded back."""
    from flipcheck.compressors.stats import measure
    from flipcheck.models import load_model, resolve_source
    from flipcheck.orchestrate.evaluate import evaluate

    root, block, _ = searched
    folders = [c["folder"] for c in block["candidates"]]
    report = evaluate(str(parent4), folders, tasks=TASKS.split(","), include_path=str(task_dir),
                      cache_dir=root / "cache", batch_size=8)
    for c, entry in zip(block["candidates"], report["children"], strict=True):
        for task, t in c["tasks"].items():
            e = entry["tasks"][task]
            assert (t["n"], t["n_c2i"], t["n_i2c"], t["flips"]) == (e["n"], e["n_c2i"], e["n_i2c"], e["flips"]), c["name"]
            assert math.isclose(t["kl"], e["kl_options"]["mean"], rel_tol=1e-6, abs_tol=1e-9)
        child = load_model(resolve_source(c["folder"]), device="cpu")
        child(input_ids=torch.tensor([[3, 4, 5]]))  # unpacks the compressed-tensors weights
        assert measure(child).storage_bits == pytest.approx(c["size_bits"])


def test_recipe_yaml_is_the_winner_and_flipcheck_run_accepts_it(searched, task_dir):
    from flipcheck.recipes.schema import load_recipe

    root, block, _ = searched
    winner = next(c for c in block["candidates"] if c["winner"])
    recipe = load_recipe(root / "run" / "recipe.yaml")
    [step] = recipe.steps
    assert step.method == "rtn" and step.config().model_dump(mode="json") == step.config().model_validate(winner["settings"]).model_dump(mode="json")
    assert recipe.gate is not None and recipe.gate.max_flips == BUDGET
    res = CliRunner().invoke(app, ["run", str(root / "run" / "recipe.yaml"), "--out", str(root / "rerun"),
                                   "--cache-dir", str(root / "cache")])
    assert res.exit_code == 0, res.output  # compressed again, evaluated, and its gate passes
    rerun = json.loads((root / "rerun" / "report.json").read_text())
    [child] = rerun["children"]
    assert {t: s["flips"] for t, s in child["tasks"].items()} == {t: s["flips"] for t, s in winner["tasks"].items()}


def test_a_second_run_resumes_with_nothing_verified_anew(searched, parent4, task_dir):
    root, block, _ = searched
    children = root / "run" / "candidates" / "children"
    stamps = {p: p.stat().st_mtime_ns for p in children.rglob("*") if p.is_file()}
    res = CliRunner().invoke(app, _args(parent4, task_dir, root / "run", root / "cache"))
    assert res.exit_code == 0, res.output
    again = json.loads((root / "run" / "report.json").read_text())["search"]
    assert again["cost"]["new"] == 0 and again["cost"]["reused"] == block["cost"]["candidates"]
    assert again["winner"] == block["winner"]
    assert {p: p.stat().st_mtime_ns for p in children.rglob("*") if p.is_file()} == stamps  # nothing compressed again
    assert "compressing" not in res.output


@pytest.mark.parametrize(("extra", "needle"), [
    (["--method", "smoothquant", "--choices", "scheme=W4A16", "--max-flips", "2%"], "allowed are rtn, gptq, awq, wanda, sparsegpt, layer_drop"),
    (["--method", "rtn", "--choices", "scheme=W4A16,W5X", "--max-flips", "2%"], "allowed: "),
    (["--method", "rtn", "--choices", "sparsity=0.5,0.6", "--max-flips", "2%"], "rtn chooses scheme per layer"),
    (["--method", "rtn", "--choices", "scheme=W4A16,W8A16", "--max-flips", "two"], "--max-flips 'two': expected a fraction"),
    (["--method", "rtn", "--choices", "scheme=W4A16,W8A16"], "give at least one budget: --max-flips"),
    (["--method", "layer_drop", "--choices", "scheme=W4A16", "--max-flips", "2%"], "takes no --choices"),
    (["--method", "rtn", "--choices", "scheme=W4A16,W8A16", "--max-flips", "2%", "--confidence", "2"], "a confidence level in [0.5, 1)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, needle):
    res = CliRunner().invoke(app, ["search", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert needle in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()


def test_allocations_become_the_step_settings_the_schema_validates():
    from flipcheck.recipes.schema import StepSpec

    space = parse_space("rtn", "scheme=W4A16,W8A16,none", {"group_size": "64"})
    assert space.labels() == ["W4A16", "W8A16", "none"] and [c.keep for c in space.choices] == [False, False, True]
    s = space.settings([0, 0, 1, 1, 0, 2])
    assert s == {"group_size": "64", "scheme": "W4A16", "layers": {"2-3": "W8A16", "5": "none"}}
    StepSpec(method="rtn", settings=s)
    assert space.settings([1, 1, 1]) == {"group_size": "64", "scheme": "W8A16", "layers": None}
    assert space.settings([2, 2]) is None  # every layer keeps the parent's: no child
    awq = parse_space("awq", "scheme=w4a16_asym,W8A16,none")
    assert awq.labels() == ["W4A16_ASYM", "W8A16", "none"]
    assert awq.settings([0, 1, 2, 0]) == {"scheme": "W4A16_ASYM", "layers": {"1": "W8A16", "2": "none"}}
    StepSpec(method="awq", settings=awq.settings([0, 1, 2, 0]))
    prune = parse_space("wanda", "sparsity=0.5,0.25,0")
    assert prune.settings([1, 2, 2, 0]) == {"sparsity": 0.5, "layers": {"0": 0.25, "1-2": 0.0}}  # default: the first compressing choice on a tie
    StepSpec(method="wanda", settings=prune.settings([1, 2, 2, 0]))
    drop = parse_space("layer_drop", None)
    assert drop.settings([0, 1, 0, 1]) == {"layers": [1, 3]} and drop.settings([1, 1]) is None
    assert ranges({0: "a", 1: "a", 2: "b", 4: "b", 5: "b"}) == {"0-1": "a", "2": "b", "4-5": "b"}
    with pytest.raises(FlipcheckError, match="given twice"):
        parse_space("gptq", "scheme=W4A16,w4a16")


def test_pareto_front():
    from flipcheck.decide.search import pareto

    assert pareto([(1, 5), (2, 2), (3, 2), (4, 0), (2.5, 3), (None, 0)]) == {0, 1, 3}


def test_swap_in_kl_is_zero_for_the_parents_own_layer_and_a_skip_equals_the_dropped_child(tiny_model):
    """The sensitivity probe: the parent's own layer swapped in changes nothing; SkipLayer at layer i
    gives the text KL of the layer_drop child without layer i, from a full forward."""
    from flipcheck.compressors.registry import get_method, make_config
    from flipcheck.decide.localize import SkipLayer, _mean_kl, swap_in_kl

    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    own = swap_in_kl(tiny_model, dict(enumerate(tiny_model.model.layers)), ids, batch_size=2)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in own.values())
    skip = swap_in_kl(tiny_model, {1: SkipLayer()}, ids, batch_size=2)[1]
    dropped = copy.deepcopy(tiny_model)
    get_method("layer_drop").apply(dropped, make_config("layer_drop", {"layers": [1]}), None)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        kl, n = _mean_kl(logp, dropped(input_ids=ids, use_cache=False).logits)
    assert skip > 0 and skip == pytest.approx(kl / n, rel=1e-4)


def test_layer_drop_search_drops_the_layers_the_budget_allows(parent4, task_dir, tmp_path):
    """On a random model one dropped layer already flips half of tiny_letters: with a 60 % budget the
    search drops more than one layer, and every child it verified really has those layers removed."""
    from flipcheck.recipes.schema import load_recipe

    res = CliRunner().invoke(app, ["search", str(parent4), "--method", "layer_drop", "--max-flips", "60%", "--tasks", TASKS,
                                   "--include-path", str(task_dir), "--out", str(tmp_path / "run"),
                                   "--cache-dir", str(tmp_path / "cache"), "--calibration", "demo", "--probe-windows", "2",
                                   "--probe-ctx", "32", "--batch-size", "8", "--no-confirm"])
    assert res.exit_code == 0, res.output
    block = json.loads((tmp_path / "run" / "report.json").read_text())["search"]
    winner = next(c for c in block["candidates"] if c["winner"])
    dropped = [i for i, a in enumerate(winner["allocation"]) if a == "drop"]
    assert winner["passed"] and len(dropped) >= 2 and winner["settings"]["layers"] == dropped
    for c in block["candidates"]:
        config = json.loads((tmp_path / "run" / "candidates" / "children" / c["name"] / "config.json").read_text())
        assert config["num_hidden_layers"] == 4 - c["allocation"].count("drop")
    [step] = load_recipe(tmp_path / "run" / "recipe.yaml").steps
    assert step.method == "layer_drop" and step.config().layers == dropped


def test_search_command_and_function_offer_every_evaluation_setting():
    """The evaluation options are declared once (tests/test_settings_declared_once.py); search offers all
    of them but eval's own (the floors, whose rows are no candidates, and sampling: search judges the
    greedy answers its gate counts)."""
    import inspect

    from flipcheck.evaluation.options import EVAL_ONLY, EvalOptions

    cli = set(inspect.signature(next(c for c in app.registered_commands if c.name == "search").callback).parameters)
    assert set(EvalOptions.model_fields) - set(EVAL_ONLY) <= cli and not set(EVAL_ONLY) & cli


def test_predicted_beside_measured_and_their_rank_correlation(searched):
    """Every candidate carries its additive prediction and its measured KL and flips (micro, over both
    tasks); ρ is Spearman's over the candidates, and the report prints it."""
    from flipcheck.decide.additivity import spearman

    root, block, output = searched
    rows = block["candidates"]
    for c in rows:
        assert c["predicted"] == c["damage"] and c["measured"]["kl"] == c["micro"]["kl"]
        assert c["measured"]["flips"] == c["micro"]["flips"]
    a = block["additivity"]
    assert a["n"] == len(rows)
    x, y = [c["damage"] for c in rows], [c["micro"]["kl"] for c in rows]
    assert a["spearman_kl"] == pytest.approx(spearman(x, y))
    assert "Spearman rank correlation" in " ".join(output.split())


def test_spearman_by_hand():
    from flipcheck.decide.additivity import spearman

    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # rank differences 0, 1, -1, 0
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_awq_search_verifies_children_whose_layers_hold_the_chosen_schemes(parent4, task_dir, tmp_path):
    """--method awq: every verified child's saved quantization_config gives each layer's Linears the
    scheme of its allocation (int8 for W8A16, int4 for W4A16_ASYM)."""
    import re

    res = CliRunner().invoke(app, ["search", str(parent4), "--method", "awq", "--choices", "scheme=W4A16_ASYM,W8A16",
                                   "--set", "n_grid=4", "--max-flips", BUDGET, "--tasks", TASKS, "--include-path", str(task_dir),
                                   "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--calibration", "demo",
                                   "--probe-windows", "2", "--probe-ctx", "32", "--batch-size", "8", "--max-candidates", "3",
                                   "--no-confirm"])
    assert res.exit_code in (0, 1), res.output
    block = json.loads((tmp_path / "run" / "report.json").read_text())["search"]
    assert len(block["candidates"]) >= 2
    for c in block["candidates"]:
        groups = json.loads((tmp_path / "run" / "candidates" / "children" / c["name"] / "config.json").read_text())[
            "quantization_config"]["config_groups"].values()
        for i, scheme in enumerate(c["allocation"]):
            name = f"model.layers.{i}.mlp.down_proj"
            bits = [g["weights"]["num_bits"] for g in groups
                    if any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)) for t in g["targets"])]
            assert bits == [8 if scheme == "W8A16" else 4], (c["name"], i, bits)
