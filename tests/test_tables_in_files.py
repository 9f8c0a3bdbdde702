"""Every table the CLI prints stays whole when the output goes to a file: eval, sweep, run, gate,
localize and plan, each a real subprocess with stdout and stderr redirected to a file and no $COLUMNS
(rich's default for a file was 80 columns, which cut figures to `0.48…`). search: tests/decide/test_search.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CUT = "…"  # what rich puts where a cell's text did not fit


def _run(tmp_path, name, *args, ok=(0,)):
    env = {**os.environ, "FLIPCHECK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    path = tmp_path / f"{name}.txt"
    with open(path, "w") as f:
        res = subprocess.run([sys.executable, "-c", "from flipcheck.cli import app; app()", *map(str, args)],
                             stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=600)
    text = path.read_text()
    assert res.returncode in ok, text[-3000:]
    assert CUT not in text, f"{name}: a cut figure in\n{text}"
    return text


@pytest.fixture(scope="module")
def noise_child(tmp_path_factory, tiny_model_dir):
    from flipcheck.compressors.pipeline import compress

    out = tmp_path_factory.mktemp("tables") / "noise"
    compress(str(tiny_model_dir), [("noise", {"sigma": 0.2, "seed": 1})], out=out, device="cpu")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(f"The {a} saw a {c} ball and ran after it slowly." for a in ("cat", "dog", "cow")
                                for c in ("red", "blue", "green", "white") * 4))
    return path


def test_eval_gate_and_plan_tables_are_whole_in_a_file(tiny_model_dir, noise_child, task_dir, text_file, tmp_path):
    out = tmp_path / "eval"
    text = _run(tmp_path, "eval", "eval", tiny_model_dir, noise_child, "--tasks", "tiny_letters,tiny_sentences",
                "--include-path", task_dir, "--text", text_file, "--ctx", "32", "--limit", "8", "--device", "cpu",
                "--batch-size", "8", "--out", out)
    report = json.loads((out / "report.json").read_text())
    child = report["children"][0]
    assert "tiny_sentences" in text and "text.txt" in text  # both tables
    assert "Δacc pts [95% CI]" in text and "top-1 agree" in text  # every column: a file is not a narrow terminal
    assert f"{child['tasks']['tiny_sentences']['n']}" in text
    text = _run(tmp_path, "gate", "gate", out, "--max-flips", "0%", "--max-kl", "0.00001", ok=(0, 1))
    assert "flips" in text
    text = _run(tmp_path, "plan", "plan", "--max-flips", "2%", "--expected", "0.5%")
    assert "questions" in text


def test_sweep_run_and_localize_tables_are_whole_in_a_file(tiny_model_dir, noise_child, task_dir, text_file, tmp_path):
    _run(tmp_path, "sweep", "sweep", tiny_model_dir, "--method", "noise", "--grid", "sigma=0.05,0.3",
         "--tasks", "tiny_letters", "--include-path", task_dir, "--limit", "8", "--device", "cpu", "--batch-size", "8",
         "--out", tmp_path / "sweep")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tables\nparent: {tiny_model_dir}\nchildren:\n  - name: noisy\n    steps:\n"
                      "      - method: noise\n        settings: {sigma: 0.1}\n"
                      f"evaluation:\n  tasks: [tiny_letters]\n  include_path: {task_dir}\n  limit: 8\n  batch_size: 8\n"
                      "device: cpu\n")
    _run(tmp_path, "run", "run", recipe, "--out", tmp_path / "run")
    text = _run(tmp_path, "localize", "localize", tiny_model_dir, noise_child, "--text", text_file, "--windows", "2",
                "--ctx", "16", "--device", "cpu", "--out", tmp_path / "loc")
    block = json.loads((tmp_path / "loc" / "report.json").read_text())["localize"]
    worst = max(block["layers"], key=lambda r: r["kl_swap_in"] or 0)
    assert f"{worst['share_swap_in']:.1%}" in text or f"{worst['kl_swap_in']:.4g}" in text  # a figure, whole
