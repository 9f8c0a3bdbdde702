"""The `flipcheck` command end to end on tiny local models and task folders."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.models import read_provenance, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("cli") / "parent"
    save_model(tiny_model, tiny_tokenizer, out, {"parent": None})
    return out


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_compress_eval_gate_round_trip(parent_dir, task_dir, tmp_path):
    child = tmp_path / "child"
    res, out = invoke("compress", parent_dir, "--method", "noise", "--set", "sigma=0.3", "--out", child)
    assert res.exit_code == 0, out
    prov = read_provenance(child)
    assert prov["parent"] == str(parent_dir) and prov["recipe"] == [
        {"method": "noise", "settings": {"sigma": 0.3, "seed": 0, "include": None, "exclude": None}}
    ]

    run = tmp_path / "run"
    res, out = invoke(
        "eval", "-", child, "--tasks", "tiny_letters,tiny_sentences", "--include-path", task_dir, "--out", run,
        "--cache-dir", tmp_path / "cache", "--batch-size", "8",
    )
    assert res.exit_code == 0, out
    report = json.loads((run / "report.json").read_text())
    assert report["parent"]["source"] == str(parent_dir)  # found through the child's flipcheck.json
    assert {"report.json", "samples.jsonl", "report.md", "report.html"} <= {p.name for p in run.iterdir()}
    assert "tiny_letters" in out, out

    child = report["children"][0]
    flips = max([child["micro"]["flips"]] + [t["flips"] for t in child["tasks"].values()])
    res, out = invoke("gate", run, "--max-flips", f"{flips * 100 + 0.1:.2f}%")
    assert res.exit_code == 0, out
    assert "PASS" in out
    if flips > 0:
        res, out = invoke("gate", run / "report.json", "--max-flips", f"{max(flips * 100 - 0.1, 0):.2f}%")
        assert res.exit_code == 1, out
        assert "FAIL" in out
    res, out = invoke("gate", run, "--max-flips", "lots")
    assert res.exit_code == 2 and "max-flips" in out.replace("_", "-")


def test_bad_input_exits_2_with_one_line(parent_dir, task_dir, tmp_path):
    res, out = invoke("compress", parent_dir, "--method", "nosie", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "unknown method 'nosie'" in out
    res, out = invoke("compress", parent_dir, "--method", "noise", "--set", "sigma=-1", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "sigma" in out
    assert not (tmp_path / "x").exists()
    res, out = invoke("eval", tmp_path / "missing", parent_dir, "--tasks", "tiny_letters", "--include-path", task_dir)
    assert res.exit_code == 2 and "does not exist" in out
    res, out = invoke("gate", tmp_path)
    assert res.exit_code == 2
    # served models: names paired with URLs, no lock-step KL, no text yet, no child at all; nothing contacted
    res, out = invoke("eval", parent_dir, "--child-url", "http://127.0.0.1:9", "--tasks", "tiny_letters")
    assert res.exit_code == 2 and "--child-model" in out
    res, out = invoke("eval", parent_dir, "--child-url", "http://127.0.0.1:9", "--child-model", "m", "--kl", "exact",
                      "--tasks", "tiny_letters", "--include-path", task_dir)
    assert res.exit_code == 2 and "lock-step" in out and "topk, bound" in out
    res, out = invoke("eval", parent_dir, "--child-url", "http://127.0.0.1:9", "--child-model", "m", "--text",
                      str(task_dir / "tiny_letters.yaml"))
    assert res.exit_code == 2 and "--text with a served child" in out
    res, out = invoke("eval", parent_dir, "--child-url", "ftp://x", "--child-model", "m", "--tasks", "tiny_letters",
                      "--include-path", task_dir)
    assert res.exit_code == 2 and "http://" in out
    res, out = invoke("eval", parent_dir, "--tasks", "tiny_letters")
    assert res.exit_code == 2 and "--child-url" in out
    res, out = invoke("eval", parent_dir, parent_dir, "--engine", "vlm", "--tasks", "tiny_letters")
    assert res.exit_code == 2 and "transformers, llama.cpp, vllm" in out


def test_list_shows_methods_and_settings():
    res, out = invoke("list")
    assert res.exit_code == 0, out
    for name in ("noise", "bnb", "layer_drop", "slicegpt", "sigma"):
        assert name in out
