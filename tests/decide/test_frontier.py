"""search with budget lists: one sensitivity pass, one confirmed recipe per budget, every verified
candidate reused across budgets; a list that does not parse is one line, exit 2, before any model."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flipcheck.cli import app


@pytest.fixture(scope="module")
def parent4(tmp_path_factory, tiny_tokenizer):
    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama

    out = tmp_path_factory.mktemp("frontier_parent") / "parent"
    save_model(build_llama(len(tiny_tokenizer), seed=0, num_hidden_layers=4), tiny_tokenizer, out, {"parent": None})
    return out


def test_one_sensitivity_pass_gives_one_confirmed_recipe_per_budget(parent4, task_dir, tmp_path):
    from flipcheck.decide.search import search
    from flipcheck.recipes.schema import load_recipe

    steps: list[str] = []
    block = search(str(parent4), "rtn", "scheme=W4A16,W8A16", out=tmp_path / "run", budgets={"max_flips": "5%,60%"},
                   tasks=["tiny_letters", "tiny_sentences"], include_path=str(task_dir), cache_dir=tmp_path / "cache",
                   calibration={"source": "demo"}, probe_windows=2, probe_ctx=32, batch_size=8, max_candidates=3,
                   on_step=steps.append)
    front = block["frontier"]
    assert [f["budgets"] for f in front] == [{"max_flips": "5%"}, {"max_flips": "60%"}]
    # the sensitivities of each choice measured once for both budgets
    assert sorted(s for s in steps if s.endswith("sensitivities")) == ["W4A16: sensitivities", "W8A16: sensitivities"]
    names = [c["name"] for c in block["candidates"]]
    assert len(names) == len(set(names)) <= 2 * 3 and block["cost"]["new"] == len(names)  # nothing verified twice
    by = {c["name"]: c for c in block["candidates"]}
    for i, f in enumerate(front):
        assert f["winner"] is not None and f["winner_confirmation"]["passed"], f
        budget = float(f["budgets"]["max_flips"].rstrip("%")) / 100
        assert f["winner_figure"] <= budget + 1e-12 and f["winner_confirmation"]["figure"] <= budget + 1e-12
        recipe = load_recipe(tmp_path / "run" / f["recipe"])
        assert recipe.gate.max_flips == f["budgets"]["max_flips"]
        assert recipe.steps[0].settings == by[f["winner"]]["settings"]
        assert f["recipe"] == f"frontier/recipe-{i + 1}.yaml"
    assert front[1]["winner_size_bits"] <= front[0]["winner_size_bits"]  # the looser budget's winner is no larger
    assert block["winner"] == front[0]["winner"] and (tmp_path / "run" / "recipe.yaml").is_file()
    assert "_frontier_blocks" not in (tmp_path / "run" / "report.json").read_text()
    assert "frontier max_flips 60%" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--max-flips", "2%,x"], "--max-flips 'x': expected a fraction (0.02) or a percentage (2%)"),
    (["--max-flips", "2%,,5%"], "a comma-separated list of budgets without empty items"),
    (["--max-flips", "2%,5%", "--max-kl", "0.1,0.2,0.3"], "budget lists of different lengths (--max-flips has 2, --max-kl has 3)"),
])
def test_a_budget_list_that_does_not_parse_is_one_line_exit_2(tmp_path, extra, needle):
    res = CliRunner().invoke(app, ["search", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--method", "rtn",
                                   "--choices", "scheme=W4A16,W8A16", *extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()
