"""Hub ids everywhere: eval, compress, sweep through a local Hugging Face cache (offline), and the
real SmolLM2 model by hub id checked against lm-eval's own HF backend."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

import flipcheck
from flipcheck.compressors.noise import NoiseConfig, apply_noise
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.model_ref import parent_source_for
from flipcheck.models import read_provenance, save_model
from flipcheck.orchestrate.evaluate import evaluate
from flipcheck.tiny import write_lm_eval_task

TASKS = ["tiny_letters"]
REV = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(hf_home: Path, repo_id: str, folder: Path, revision: str = REV, link: bool = False) -> Path:
    """Lay `folder` out as the Hugging Face cache does: hub/models--ORG--NAME/{refs/main,snapshots/REV/}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.is_file():
            if link:
                os.symlink(f.resolve(), snap / f.name)
            else:
                (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub: HF_HOME in tmp, HF_HUB_OFFLINE=1, a private flipcheck cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLIPCHECK_CACHE", str(tmp_path / "fc"))
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A parent folder (no flipcheck.json) and a noised child of it."""
    root = tmp_path_factory.mktemp("hubpair")
    tiny_model.save_pretrained(root / "parent")
    tiny_tokenizer.save_pretrained(root / "parent")
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.3, seed=1), None)
    save_model(child, tiny_tokenizer, root / "child", {"parent": str(root / "parent")})
    return root / "parent", root / "child"


def _figures(report: dict) -> dict:
    """Per-task figures that do not depend on the models' names or fingerprints."""
    return {t: {k: s[k] for k in ("n", "acc_P", "acc_C", "flips", "answer_changes")} for t, s in report["children"][0]["tasks"].items()}


def test_hub_ids_as_parent_and_as_child_in_eval(hub, pair, task_dir, tmp_path):
    parent, child = pair
    put_in_hub_cache(hub, "org/tiny", parent)
    put_in_hub_cache(hub, "org/tiny-child", child)
    kw = {"tasks": TASKS, "include_path": str(task_dir), "limit": 8, "batch_size": 8}
    by_folder = evaluate(str(parent), str(child), cache_dir=tmp_path / "c1", **kw)
    hub_parent = evaluate("org/tiny", str(child), cache_dir=tmp_path / "c2", **kw)
    hub_child = evaluate(str(parent), "org/tiny-child", cache_dir=tmp_path / "c3", **kw)
    assert _figures(hub_parent) == _figures(by_folder) == _figures(hub_child)
    assert hub_parent["parent"]["source"] == "org/tiny"
    assert hub_child["children"][0]["name"] == "org/tiny-child"
    from flipcheck.models import resolve_source

    src = resolve_source("org/tiny")
    assert src.revision == REV and src.hub_id == "org/tiny" and src.folder.name == REV
    assert src.fingerprint != resolve_source(str(parent)).fingerprint  # named by revision, not by content


def test_hub_fingerprint_comes_from_revision_and_file_list_without_reading_weights(hub, pair):
    from flipcheck.models import resolve_source

    parent, _ = pair
    snap = put_in_hub_cache(hub, "org/tiny", parent)
    fp = resolve_source("org/tiny").fingerprint
    assert not (Path(os.environ["FLIPCHECK_CACHE"]) / "fingerprints").exists()  # no weight file was hashed
    other = put_in_hub_cache(hub, "org/tiny2", parent, revision="f" * 40)
    assert resolve_source("org/tiny2").fingerprint != fp  # another repo / revision: another identity
    assert snap.name != other.name


def test_compress_records_the_hub_id_and_eval_dash_finds_it(hub, pair, task_dir, tmp_path):
    parent, _ = pair
    put_in_hub_cache(hub, "org/tiny", parent)
    res = flipcheck.compress("org/tiny", [("noise", {"sigma": 0.2})], out=tmp_path / "child")
    assert read_provenance(res.out)["parent"] == "org/tiny"
    assert parent_source_for(str(res.out)) == "org/tiny"
    report = evaluate(None, str(res.out), tasks=TASKS, include_path=str(task_dir), limit=6, cache_dir=tmp_path / "c")
    assert report["parent"]["source"] == "org/tiny"
    assert report["children"][0]["tasks"]["tiny_letters"]["n"] == 6


def test_sweep_from_a_hub_parent(hub, pair, task_dir, tmp_path):
    parent, _ = pair
    put_in_hub_cache(hub, "org/tiny", parent)
    report = flipcheck.sweep(
        "org/tiny", "noise", {"sigma": [0.0, 0.3]}, tasks=TASKS, include_path=str(task_dir), limit=6,
        out=tmp_path / "sw", cache_dir=tmp_path / "c",
    )
    assert report["parent"]["source"] == "org/tiny"
    first, second = report["children"]
    assert first["tasks"]["tiny_letters"]["flips"] == 0.0  # sigma 0 reproduces the hub parent
    assert read_provenance(tmp_path / "sw" / "children" / "noise_sigma=0.3")["parent"] == "org/tiny"


def test_hub_id_missing_from_the_offline_cache_is_one_line(hub):
    from flipcheck.models import resolve_source

    with pytest.raises(FlipcheckError, match=r"not in the local cache .*local folder") as err:
        resolve_source("org/not-there")
    assert "\n" not in str(err.value)


# -- the real model by hub id ----------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris", ["Paris", "Lyon", "Marseille", "Nice"]),
    ("Germany", "Berlin", ["Munich", "Berlin", "Hamburg", "Cologne"]),
    ("Italy", "Rome", ["Milan", "Naples", "Rome", "Turin"]),
    ("Spain", "Madrid", ["Barcelona", "Seville", "Valencia", "Madrid"]),
    ("Japan", "Tokyo", ["Tokyo", "Osaka", "Kyoto", "Nagoya"]),
    ("England", "London", ["Manchester", "London", "Liverpool", "Leeds"]),
    ("Russia", "Moscow", ["Kazan", "Omsk", "Moscow", "Samara"]),
    ("Egypt", "Cairo", ["Luxor", "Giza", "Aswan", "Cairo"]),
]
CAPITALS_TASK = """output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_real_model_by_hub_id_agrees_with_lm_eval_hf_backend(hub, smollm2_dir, tmp_path):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flipcheck.evaluation.runner import _without_lm_eval_env_info
    from flipcheck.models import load_model, load_tokenizer

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    docs = [{"country": c, "choices": [" " + x for x in opts], "label": opts.index(a)} for c, a, opts in CAPITALS]
    tasks = write_lm_eval_task(tmp_path / "tasks", "capitals", docs, CAPITALS_TASK)
    put_in_hub_cache(hub, hub_id, smollm2_dir, link=True)
    model = load_model(hub_id, device="cpu")  # loaded through the hub id
    with torch.no_grad():
        for layer in model.model.layers[-4:]:  # a noised copy: the last four MLPs perturbed
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.2 * w.std())
    child = save_model(model, load_tokenizer(hub_id), tmp_path / "child", {"parent": hub_id})
    del model
    kw = {"tasks": "capitals", "include_path": str(tasks), "batch_size": 32, "use_cache": False}
    by_hub = evaluate(None, str(child), out=tmp_path / "hub_run", **kw)  # the parent from flipcheck.json: a hub id
    by_folder = evaluate(str(smollm2_dir), str(child), **kw)
    assert by_hub["parent"]["source"] == hub_id
    assert _figures(by_hub) == _figures(by_folder)
    ours = {r["doc_id"]: r["correct_P"] for r in map(json.loads, (tmp_path / "hub_run" / "samples.jsonl").read_text().splitlines())}

    lm = HFLM(pretrained=str(smollm2_dir), batch_size=32, device="cpu", dtype="float32")
    with _without_lm_eval_env_info():
        res = simple_evaluate(
            model=lm, tasks=["capitals"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True, bootstrap_iters=0,
        )
    theirs = {s["doc_id"]: bool(s["acc"]) for s in res["samples"]["capitals"]}
    assert ours == theirs and len(ours) == len(CAPITALS)
    assert sum(theirs.values()) >= 5  # the real model knows most capitals: the comparison is not vacuous
