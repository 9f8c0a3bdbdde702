"""The evaluation settings are declared once (flipcheck.evaluation.options); the evaluator's settings,
the recipe's evaluation section, evaluate/sweep/search and the command-line options of eval, sweep, run,
search and localize all derive from that declaration, which these tests check field by field: names,
types, defaults, help, and that every accepted setting reaches the cache key or the report."""

from __future__ import annotations

import inspect
import typing

import pytest

from flipcheck.cli import app
from flipcheck.commands.options import cli_type, flag
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import EVAL_ONLY, EvalOptions, ModelOptions, ScoreOptions
from flipcheck.evaluation.runner import EvalSettings
from flipcheck.orchestrate.evaluate import evaluate
from flipcheck.orchestrate.recipe import sweep
from flipcheck.recipes.schema import EvaluationSpec, Recipe

DECLARED = set(EvalSettings.model_fields)
# not user options: the bootstrap size and the parent's stored top-K are library-level knobs; the doc ids
# of a split (doc_ids) are chosen by search, and a recipe can hold them
LIBRARY_ONLY = {"n_boot", "topk", "doc_ids"}


def _command(name: str):
    return next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name).callback


def test_every_place_inherits_the_one_declaration():
    assert issubclass(EvalSettings, EvalOptions) and issubclass(EvaluationSpec, ScoreOptions)
    assert issubclass(Recipe, ModelOptions)
    assert DECLARED == set(EvalOptions.model_fields) | LIBRARY_ONLY | {"tasks"}
    assert set(EvaluationSpec.model_fields) == set(ScoreOptions.model_fields) | {"tasks", "doc_ids"}
    for name, field in EvalOptions.model_fields.items():
        assert field.description, f"{name} has no help"


@pytest.mark.parametrize(("command", "model", "exclude", "overrides"), [
    ("eval", EvalOptions, set(), False), ("sweep", EvalOptions, set(), False), ("run", EvalOptions, set(), True),
    ("search", EvalOptions, set(EVAL_ONLY), False), ("localize", ModelOptions, set(), False)])
def test_commands_offer_each_declared_option_with_its_type_default_and_help(command, model, exclude, overrides):
    """Each field is one option: its flag, the type typer parses, its default (text where the model reads
    text; None or off where `run` overrides a recipe), and its description as help."""
    params = inspect.signature(_command(command)).parameters
    for name, field in model.model_fields.items():
        if name in exclude:
            assert name not in params, (command, name)
            continue
        annotation = params[name].annotation
        typ, info = typing.get_args(annotation)[0], typing.get_args(annotation)[1]
        decls = info.param_decls or (info.default,)  # in Annotated, typer reads Option's first argument as a name
        assert decls[0] == flag(name, field) and info.help == field.description, (command, name)
        default = field.get_default(call_default_factory=True)
        if typ is bool:
            assert params[name].default is (False if overrides else default), (command, name)
            continue
        assert typ in (cli_type(field.annotation), cli_type(field.annotation) | None), (command, name, typ)
        expected = None if overrides or default in (None, []) else default
        assert params[name].default == expected or params[name].default == str(expected), (command, name)
    # and a field that is not a user option is no option
    assert not (LIBRARY_ONLY & set(params))


def test_evaluate_sweep_and_search_take_the_model_and_its_fields_by_name():
    from flipcheck.decide.search import search

    for fn in (evaluate, sweep, search):
        sig = inspect.signature(fn)
        assert "options" in sig.parameters and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    with pytest.raises(FlipcheckError, match="unknown setting 'kll'"):
        evaluate("no/such-parent", "no/such-child", tasks="x", kll="exact")  # before any model is looked up
    with pytest.raises(FlipcheckError, match="--kl 'nope': allowed are topk, bound, exact"):
        sweep("demo", "noise", {"sigma": [0.1]}, out="unused", options=EvalOptions(), kl="nope")


def test_a_search_refuses_eval_only_settings_in_one_line():
    from flipcheck.decide.search import search

    with pytest.raises(FlipcheckError, match="engine_floor are eval's options"):
        search("demo", "rtn", None, out="unused", budgets={"max_flips": "5%"}, engine_floor=True)


def test_bad_options_on_the_command_line_are_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    for args, message in [
        (["eval", "p", "c", "--kl", "nope"], "--kl 'nope': allowed are topk, bound, exact"),
        (["sweep", "demo", "-m", "noise", "-g", "sigma=0.1", "--batch-size", "big"], "allowed are an integer >= 1 or auto"),
        (["run", "paper-quant", "--scoring", "most"], "--scoring 'most': allowed are all, half"),
        (["search", "demo", "-m", "rtn", "--out", str(tmp_path), "--ctx", "2"], "--ctx 2: a window needs at least 4 tokens"),
    ]:
        result = runner.invoke(app, args)
        text = result.stderr  # the error goes to stderr, alone
        assert result.exit_code == 2 and message in text, (args, text)
        assert len([line for line in text.splitlines() if line.strip()]) == 1, text


def test_run_overrides_only_what_is_given():
    from flipcheck.recipes.schema import load_recipe, with_overrides

    r = load_recipe("paper-quant")
    same = with_overrides(r, {})
    assert same.evaluation == r.evaluation and same.device == r.device
    changed = with_overrides(r, {"kl": "exact", "limit": 20.0, "dtype": "bfloat16", "tasks": ["a"]}, parent="x/y")
    assert (changed.evaluation.kl, changed.evaluation.limit, changed.dtype, changed.evaluation.tasks, changed.parent) == (
        "exact", 20, "bfloat16", ["a"], "x/y")
    assert changed.evaluation.ctx == r.evaluation.ctx and changed.evaluation.seed == r.evaluation.seed


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

    from flipcheck.errors import FlipcheckError

    with pytest.raises(FlipcheckError, match="allowed are an integer >= 1 or auto"):
        EvalSettings(tasks=["x"], batch_size="big")


# A value other than the default for every setting (the test fails when a setting is added without one).
OTHER = {"tasks": ["tiny_sums"], "include_path": "elsewhere", "num_fewshot": 2, "limit": 7, "seed": 9, "batch_size": 3,
         "topk": 64, "device": "meta", "dtype": "bfloat16", "trust_remote_code": True, "n_boot": 200, "metric": "acc",
         "filter": "strict-match", "per_subtask": True, "kl": "exact", "texts": ["a.txt"], "ctx": 64, "scoring": "half",
         "engine": "llama.cpp", "parent_engine": "transformers", "child_engine": "vllm", "engine_floor": True,
         "sample": "temperature=0.7", "samples": 2, "doc_ids": {"tiny_sums": [1, 2]}, "noise_floor": True}


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
        start = base if name != "samples" else base.replace(sample="temperature=0.7")  # needs --sample
        changed = start.replace(**{name: value})
        assert changed.key_fields() != start.key_fields() or changed.public() != start.public(), \
            f"{name} reaches neither the cache key nor the report"
