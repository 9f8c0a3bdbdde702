"""The result cache: atomic under concurrent writers, older formats are misses, and nothing stale is
served (changed weights under an old flipcheck.json, an edited tokenizer)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest

from flipcheck.compressors.noise import NoiseConfig, apply_noise
from flipcheck.evaluation.cache import ResultCache
from flipcheck.models import read_provenance, save_model
from flipcheck.orchestrate.evaluate import evaluate

TASKS = ["tiny_letters"]


@dataclass
class Rec:
    ll: float
    kl: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logp: np.ndarray | None = None
    top1_agree: np.ndarray | None = None
    token_ids: np.ndarray | None = None


def _entry(n: int, value: float) -> tuple[dict, dict]:
    samples = {"t": [{"doc_id": i, "resps": [[value]], "target": "x" * 50} for i in range(n)]}
    records = {("t", i, 0): Rec(ll=value, kl=np.full(20, value), topk_ids=np.arange(64) + i) for i in range(n)}
    return samples, records


WRITER = """
import sys
from dataclasses import dataclass
import numpy as np
from flipcheck.evaluation.cache import ResultCache

@dataclass
class Rec:
    ll: float
    kl: object = None
    topk_ids: object = None

root, key, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
cache = ResultCache(root)
samples = {"t": [{"doc_id": i, "resps": [[0.5]], "target": "x" * 50} for i in range(300)]}
records = {("t", i, 0): Rec(ll=0.5, kl=np.full(20, 0.5), topk_ids=np.arange(64) + i) for i in range(300)}
for _ in range(rounds):
    cache.put(key, samples, records, {"unit": "t"})
"""


def test_two_processes_writing_one_key_while_a_reader_reads(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    writers = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), "k" * 32, "40"], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    cache = ResultCache(tmp_path / "cache")
    seen = 0
    while any(w.poll() is None for w in writers):
        got = cache.get("k" * 32, Rec)
        if got is not None:  # never a half entry: complete and equal to what was written
            samples, records = got
            assert len(samples["t"]) == 300 and len(records) == 300
            assert records[("t", 299, 0)].topk_ids[-1] == 63 + 299 and records[("t", 0, 0)].kl.tolist() == [0.5] * 20
            seen += 1
    errs = [w.stderr.read().decode() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errs
    assert seen > 0
    assert cache.get("k" * 32, Rec) is not None
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == [f"{'k' * 32}.safetensors"]  # no temporary files left behind


def test_an_entry_of_another_format_or_a_damaged_one_is_a_miss(tmp_path):
    from safetensors.numpy import save_file

    cache = ResultCache(tmp_path)
    samples, records = _entry(3, 1.0)
    cache.put("a" * 32, samples, records)
    assert cache.get("a" * 32, Rec)[1][("t", 2, 0)].ll == 1.0
    for k in ("b", "c"):
        cache.path(k * 32).parent.mkdir(parents=True)
    save_file({"x": np.zeros(3)}, str(cache.path("b" * 32)), metadata={"format": "1"})  # an older writer
    cache.path("c" * 32).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # damaged
    assert cache.get("b" * 32, Rec) is None and cache.get("c" * 32, Rec) is None
    cache.put("b" * 32, samples, records)  # the miss is recomputed and replaces the old entry
    assert cache.get("b" * 32, Rec) is not None


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("stale")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    save_model(copy.deepcopy(tiny_model), tiny_tokenizer, root / "twin", {"parent": str(root / "parent")})
    return root


def _run(parent, child, task_dir, cache):
    return evaluate(str(parent), str(child), tasks=TASKS, include_path=str(task_dir), limit=6, cache_dir=cache, batch_size=8)


def test_changed_weights_under_an_old_flipcheck_json_are_not_served_from_the_cache(family, tiny_model, task_dir, tmp_path):
    first = _run(family / "parent", family / "twin", task_dir, tmp_path / "cache")
    assert first["children"][0]["tasks"]["tiny_letters"]["kl_options"]["max"] <= 1e-6
    copied = tmp_path / "copied"
    shutil.copytree(family / "twin", copied)  # flipcheck.json (and its fingerprint) copied along
    noisy = copy.deepcopy(tiny_model)
    apply_noise(noisy, NoiseConfig(sigma=0.5, seed=3), None)
    noisy.save_pretrained(copied)
    assert read_provenance(copied)["fingerprint"] == first["children"][0]["fingerprint"]
    second = _run(family / "parent", copied, task_dir, tmp_path / "cache")
    assert second["children"][0]["fingerprint"] != first["children"][0]["fingerprint"]
    assert second["children"][0]["tasks"]["tiny_letters"]["kl_options"]["max"] > 1e-3


def test_an_edited_tokenizer_or_length_limit_changes_the_keys(family, task_dir, tmp_path):
    from flipcheck.evaluation.model_ref import child_ref
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef

    parent, child = tmp_path / "parent", tmp_path / "child"
    shutil.copytree(family / "parent", parent)
    shutil.copytree(family / "twin", child)

    def keys() -> tuple[str, str]:
        ev = Evaluator(ModelRef("parent", str(parent)), EvalSettings(tasks=TASKS, include_path=str(task_dir)))
        ref = child_ref(str(child))
        ev.parent.ensure_identity(ev.settings)
        ref.ensure_identity(ev.settings)
        return ev._parent_key("tiny_letters"), ev._child_key(ref, "tiny_letters")

    p0, c0 = keys()
    assert keys() == (p0, c0)  # nothing changed: hits
    cfg = json.loads((child / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 64  # the child's length limit
    (child / "tokenizer_config.json").write_text(json.dumps(cfg))
    p1, c1 = keys()
    assert p1 == p0 and c1 != c0
    spec = json.loads((parent / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # same vocabulary, another normalisation
    (parent / "tokenizer.json").write_text(json.dumps(spec))
    p2, c2 = keys()
    assert p2 != p1 and c2 != c1  # a child's results are keyed on its parent's identity too
    (parent / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "max_length": 32}))
    p3, _ = keys()
    assert p3 != p2  # the model's config files (max length, generation settings)


def test_non_finite_floats_come_back_as_floats_and_text_stays_text(tmp_path):
    """A -inf loglikelihood is restored as a float; a model that generated the text "nan" keeps its text."""
    cache = ResultCache(tmp_path)
    samples = {"t": [{"doc_id": 0, "resps": [[[float("-inf"), False]]], "filtered_resps": ["nan"], "target": "inf"}]}
    records = {("t", 0, 0): Rec(ll=float("-inf"))}
    cache.put("k" * 32, samples, records)
    got_samples, got_records = cache.get("k" * 32, Rec)
    s = got_samples["t"][0]
    assert s["resps"][0][0][0] == float("-inf") and s["filtered_resps"] == ["nan"] and s["target"] == "inf"
    assert got_records[("t", 0, 0)].ll == float("-inf")
