"""Recipe schema: validation with line numbers, sweeps expanded, every bundled recipe round-trips."""

from __future__ import annotations

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.recipes.schema import bundled_recipes, dump_recipe, load_recipe, parse_recipe

GOOD = """\
name: two-children
parent: some/folder
calibration: {source: demo, samples: 4, seq_len: 32}
children:
  - name: noisy
    steps:
      - {method: noise, settings: {sigma: 0.05}}
sweeps:
  - method: noise
    grid: {sigma: [0.01, "0.02"]}
evaluation: {tasks: [flipcheck_demo], limit: 20}
gate: {max_flips: 5%, max_kl: 0.05}
"""


def test_sweep_expands_to_typed_children():
    r = parse_recipe(GOOD)
    names = [c.name for c in r.all_children()]
    assert names == ["noisy", "noise sigma=0.01", "noise sigma=0.02"]
    assert [c.strength for c in r.all_children()] == [None, {"sigma": 0.01}, {"sigma": 0.02}]


def test_round_trip_load_dump_load():
    r = parse_recipe(GOOD)
    assert parse_recipe(dump_recipe(r)) == r


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_loads_and_round_trips(name):
    r = load_recipe(name)
    assert r.all_children(), name
    assert parse_recipe(dump_recipe(r)) == r


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (GOOD.replace("samples: 4", "samples: 4, sampels: 3"), r":3: calibration.sampels: unknown key 'sampels'.*samples"),
        (GOOD.replace("sigma: 0.05", "sigma: -1"), r":7: children.0.steps.0: .*sigma"),
        (GOOD.replace("method: noise, settings", "method: nosie, settings"), r":7: .*unknown method 'nosie'.*Did you mean: noise"),
        (GOOD.replace('"0.02"', "-0.5"), r":9: sweeps.0: .*sigma"),
        (GOOD.replace("max_flips: 5%", "max_flips: lots"), r":12: gate: .*max_flips"),
        (GOOD.replace("limit: 20", "limit: 0"), r":11: evaluation.limit"),
        ("name: [unclosed", r"not valid YAML"),
        ("- a list", r"a recipe is a YAML mapping"),
        ("name: nothing-to-do\nparent: x\n", r"needs `steps`, `children` or `sweeps`"),
    ],
)
def test_bad_recipes_fail_with_line_numbers(text, pattern):
    with pytest.raises(FlipcheckError, match=pattern):
        parse_recipe(text, "r.yaml")


def test_unknown_recipe_name_lists_bundled():
    with pytest.raises(FlipcheckError, match="neither a file nor a bundled recipe"):
        load_recipe("paper-quantt")


def test_a_misspelt_required_key_is_named_with_its_line_through_the_cli(tmp_path):
    """`stepz:` also leaves `steps` missing; the error names the unknown key, not the missing one."""
    from typer.testing import CliRunner

    from flipcheck.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace("    steps:\n", "    stepz:\n"))
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")])
    out = res.stderr
    assert res.exit_code == 2, res.output
    assert out.startswith("error: ") and out.count("error: ") == 1  # one message (the terminal may wrap it)
    line = " ".join(out.split())
    assert ":6: children.0.stepz: unknown key 'stepz'; allowed: name, steps, strength." in line
    assert "Did you mean: steps?" in line and "Field required" not in line
    assert not (tmp_path / "out").exists()


PER_LAYER = """\
name: mixed
parent: some/folder
children:
  - name: w4-w8
    steps:
      - {method: gptq, settings: {scheme: W4A16, layers: {"0-3": w8a16, "29": none}}}
  - name: pruned
    steps:
      - {method: wanda, settings: {sparsity: 0.5, layers: "0-1:0.2"}}
  - name: dropped
    steps:
      - {method: layer_drop, settings: {layers: [14, 12]}}
evaluation: {tasks: [flipcheck_demo], limit: 20}
gate: {max_flips: 2%, confidence: 0.95}
"""


def test_per_layer_settings_and_gate_confidence_round_trip():
    r = parse_recipe(PER_LAYER)
    configs = [c.steps[0].config() for c in r.all_children()]
    assert configs[0].layers == {"0-3": "W8A16", "29": "none"}
    assert configs[1].layers == {"0-1": 0.2} and configs[2].layers == [12, 14]
    assert r.gate.budgets()["confidence"] == "0.95"
    assert parse_recipe(dump_recipe(r)) == r


@pytest.mark.parametrize(("old", "new", "pattern"), [
    ('"0-3": w8a16', '"0-3": w3a16', r":6: children.0.steps.0: .*'w3a16' is not allowed; allowed: W4A16"),
    ("confidence: 0.95", "confidence: 2", r"gate.confidence .*\[0\.5, 1\)"),
])
def test_bad_per_layer_recipes_fail_with_the_line(old, new, pattern):
    with pytest.raises(FlipcheckError, match=pattern):
        parse_recipe(PER_LAYER.replace(old, new), "r.yaml")
