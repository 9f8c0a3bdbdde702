"""Scoring engines against each other on the same weights (no mocks: llama.cpp through llama-cpp-python).

The engine floor: the tiny Llama scored by transformers and by llama.cpp on a float32 GGUF of it
must give identical answers, option log-likelihoods within 1e-4 and vocabulary KL under 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import corpus
from flipcheck.errors import FlipcheckError

pytest.importorskip("llama_cpp", reason="the llama.cpp engine tests need flipcheck[llamacpp] (make test installs it)")

TASKS = "tiny_letters,tiny_sentences,tiny_sums"


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model written as a float32 GGUF, with its tokenizer files beside it."""
    from flipcheck.compressors.gguf_convert import write_gguf

    folder = tmp_path_factory.mktemp("gguf_f32")
    tiny_tokenizer.save_pretrained(folder)
    return write_gguf(tiny_model, tiny_tokenizer, folder / "tiny-F32.gguf")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(corpus()[:120]))
    return path


def _requests(tok) -> list[tuple[list[int], list[int]]]:
    items = []
    for line in corpus()[:40]:
        ids = tok(line)["input_ids"]
        cut = max(1, len(ids) // 2)
        items.append((ids[:cut], ids[cut:]))
    return items


def test_llamacpp_logits_equal_transformers_on_an_f32_gguf(tiny_model, tiny_tokenizer, f32_gguf):
    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine
    from flipcheck.evaluation.lm import FlipLM

    engine = LlamaCppEngine(f32_gguf)
    try:
        assert engine.vocab == len(tiny_tokenizer) and engine.identity()["dtype"] == "F32"
        items = _requests(tiny_tokenizer)
        hf = FlipLM(tiny_model, tiny_tokenizer)._score(items, disable_tqdm=True)
        ll = FlipLM(engine, tiny_tokenizer)._score(items, disable_tqdm=True)
        worst = max(float(np.abs(a.own.token_logp - b.own.token_logp).max()) for a, b in zip(hf, ll, strict=True))
        assert worst < 1e-4, worst
        assert all(np.array_equal(a.own.argmax, b.own.argmax) for a, b in zip(hf, ll, strict=True))
        # lock-step with llama.cpp as the reference: exact vocabulary KL at every scored position
        both = FlipLM(tiny_model, tiny_tokenizer, reference=engine)._score(items, lockstep=True, disable_tqdm=True)
        kl = np.concatenate([r.kl for r in both])
        assert np.nanmax(kl) < 1e-5 and np.isfinite(kl).all()
    finally:
        engine.close()


def test_engine_floor_through_evaluate(tiny_model_dir, task_dir, f32_gguf, text_file, tmp_path):
    """The same weights on two engines: identical answers, KL under 1e-5, on questions, generation and text,
    and each model's engine named in the report."""
    from flipcheck.orchestrate.evaluate import evaluate

    report = evaluate(str(tiny_model_dir), str(f32_gguf), tasks=TASKS, include_path=str(task_dir), kl="exact",
                      texts=[str(text_file)], ctx=64, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    child = report["children"][0]
    assert report["parent"]["engine"]["name"] == "transformers"
    assert child["engine"]["name"] == "llama.cpp" and child["engine"]["dtype"] == "F32"
    for task, s in child["tasks"].items():
        assert s["flips"] == 0 and s["answer_changes"] == 0, task
        assert s["kl_vocab"]["mean"] < 1e-5, (task, s["kl_vocab"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["pred_P"] == r["pred_C"] for r in rows)
    lls = [(a, b) for r in rows if r.get("ll_P") for a, b in zip(r["ll_P"], r["ll_C"], strict=True)]
    assert lls and max(abs(a - b) for a, b in lls) < 1e-4  # option log-likelihoods of the two engines
    gen = [r for r in rows if r["task"] == "tiny_sums"]
    assert gen and all(r.get("output_P") == r.get("output_C") for r in gen)
    text = child["corpus"]["corpus.txt"]
    assert text["kl"]["mean"] < 1e-5 and text["top1_agree"]["mean"] == 1.0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "llama.cpp" in md and "transformers" in md


def test_engine_floor_row(tiny_model_dir, task_dir, tmp_path):
    """--engine-floor: the parent on llama.cpp (an F32 GGUF written from it) as a floor row."""
    from flipcheck.orchestrate.evaluate import evaluate

    child = tmp_path / "noisy"
    from flipcheck.compressors.pipeline import compress

    compress(str(tiny_model_dir), [("noise", {"sigma": 0.2})], out=child)
    report = evaluate(str(tiny_model_dir), str(child), tasks="tiny_letters", include_path=str(task_dir),
                      engine_floor=True, cache_dir=tmp_path / "cache")
    (row,) = report["noise_floor"]
    assert row["name"].startswith("noise floor: llama.cpp")
    assert row["engine"]["name"] == "llama.cpp"
    assert row["micro"]["flips"] == 0 and row["micro"]["kl_vocab"]["mean"] < 1e-5
    assert report["children"][0]["micro"]["kl_vocab"]["mean"] > 100 * max(row["micro"]["kl_vocab"]["mean"], 1e-9)


def test_gguf_sources_path_folder_and_folder_colon_file(f32_gguf):
    from flipcheck.models import resolve_source

    by_path = resolve_source(str(f32_gguf))
    by_colon = resolve_source(f"{f32_gguf.parent}:{f32_gguf.name}")
    by_folder = resolve_source(str(f32_gguf.parent))  # a folder holding one .gguf and no config.json
    assert by_path.gguf == by_colon.gguf == by_folder.gguf == f32_gguf.name
    assert by_path.fingerprint == by_colon.fingerprint == by_folder.fingerprint
    with pytest.raises(FlipcheckError, match="does not exist"):
        resolve_source(f"{f32_gguf.parent}:missing.gguf")


def test_a_changed_gguf_is_never_served_from_the_cache(tmp_path, f32_gguf):
    from flipcheck.models import resolve_source

    copy = tmp_path / "m.gguf"
    copy.write_bytes(f32_gguf.read_bytes())
    before = resolve_source(str(copy)).fingerprint
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0xFF  # one weight byte
    copy.write_bytes(bytes(data))
    assert resolve_source(str(copy)).fingerprint != before


def test_hub_gguf_through_a_local_hf_cache(tmp_path, monkeypatch, f32_gguf, tiny_model_dir, task_dir):
    """ORG/REPO:file.gguf, offline, from a Hugging Face cache laid out as huggingface_hub lays it out."""
    from flipcheck.models import resolve_source
    from flipcheck.orchestrate.evaluate import evaluate

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--someorg--tiny-GGUF"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "deadbeef"
    blob.write_bytes(f32_gguf.read_bytes())
    snap.mkdir(parents=True)
    (snap / "tiny-F32.gguf").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ms = resolve_source("someorg/tiny-GGUF:tiny-F32.gguf")
    assert ms.hub_id == "someorg/tiny-GGUF" and ms.revision == rev and ms.gguf == "tiny-F32.gguf"
    assert ms.ref == "someorg/tiny-GGUF:tiny-F32.gguf"
    report = evaluate(str(tiny_model_dir), "someorg/tiny-GGUF:tiny-F32.gguf", tasks="tiny_letters",
                      include_path=str(task_dir), cache_dir=tmp_path / "cache")
    assert report["children"][0]["micro"]["flips"] == 0
    with pytest.raises(FlipcheckError, match="has no file 'other.gguf'"):
        resolve_source("someorg/tiny-GGUF:other.gguf")


def test_a_gguf_with_another_vocabulary_is_refused_before_scoring(tmp_path, tiny_model_dir, task_dir):
    from flipcheck.compressors.gguf_convert import write_gguf
    from flipcheck.orchestrate.evaluate import evaluate
    from flipcheck.tiny import build_llama, build_tokenizer

    tok = build_tokenizer([f"other words {i} and more text" for i in range(200)], vocab_size=300)
    folder = tmp_path / "other"
    folder.mkdir()
    tok.save_pretrained(folder)
    write_gguf(build_llama(len(tok), seed=3), tok, folder / "other.gguf")
    cache = tmp_path / "cache"
    with pytest.raises(FlipcheckError, match="tokenizer differs from the parent"):
        evaluate(str(tiny_model_dir), str(folder / "other.gguf"), tasks="tiny_letters", include_path=str(task_dir),
                 cache_dir=cache)
    assert not any(cache.rglob("*.npz")) and not any(cache.rglob("*.pkl"))  # nothing was scored


def test_unknown_engine_is_one_line(tiny_model_dir):
    from flipcheck.evaluation.runner import EvalSettings

    with pytest.raises(FlipcheckError, match="allowed are auto, transformers, llama.cpp"):
        EvalSettings(tasks=["x"], engine="tensorrt")


def test_llamacpp_engine_refuses_a_safetensors_folder(tiny_model_dir):
    from flipcheck.evaluation.engines import open_engine
    from flipcheck.models import resolve_source

    with pytest.raises(FlipcheckError, match="scores GGUF files"):
        open_engine(resolve_source(str(tiny_model_dir)), "llama.cpp")


def test_transformers_dequantizes_a_gguf_child_and_says_so(tiny_model_dir, task_dir, f32_gguf, tmp_path):
    from flipcheck.orchestrate.evaluate import evaluate

    report = evaluate(str(tiny_model_dir), str(f32_gguf), tasks="tiny_letters", include_path=str(task_dir),
                      child_engine="transformers", cache_dir=tmp_path / "cache")
    eng = report["children"][0]["engine"]
    assert eng["name"] == "transformers" and eng["dequantized_from"] == "GGUF F32"
    assert report["children"][0]["micro"]["flips"] == 0
    assert report["children"][0]["micro"]["kl_vocab"]["mean"] < 1e-5


def test_generation_on_llamacpp_matches_hf_generate(tiny_model, tiny_tokenizer, f32_gguf):
    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(f32_gguf)
    try:
        ctx = tiny_tokenizer("3 4 =")["input_ids"]
        (new,) = engine.generate([ctx], 6, lambda toks: False, set())
        with torch.no_grad():
            out = tiny_model.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        assert new == out[0, len(ctx):].tolist()
    finally:
        engine.close()


def test_without_llama_cpp_a_gguf_is_dequantized_and_the_engine_asks_for_the_extra(
        monkeypatch, tiny_model_dir, task_dir, f32_gguf, tmp_path):
    """llama-cpp-python not importable: a GGUF child runs on transformers (labelled), and asking for the
    llama.cpp engine is one line naming the pip command, exit 2."""
    import sys

    from typer.testing import CliRunner

    from flipcheck.cli import app
    from flipcheck.evaluation.engines import default_engine
    from flipcheck.models import resolve_source

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert default_engine(resolve_source(str(f32_gguf))) == "transformers"
    res = CliRunner().invoke(app, ["eval", str(tiny_model_dir), str(f32_gguf), "--tasks", "tiny_letters",
                                   "--include-path", str(task_dir), "--child-engine", "llama.cpp",
                                   "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert 'pip install "flipcheck[llamacpp]"' in res.output and len(res.output.strip().splitlines()) <= 3


def _kernels() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M"])
def test_llamacpp_batch_layout_floor(quant, tiny_tokenizer, task_dir, tmp_path):
    """--engine-floor for a GGUF parent on llama.cpp: transformers' dequantization of the file, and the same
    file on llama.cpp with every sequence evaluated whole instead of after the previous one's shared prefix:
    llama.cpp's own noise, labelled and small. A tiny Llama of hidden 256, so K-quant blocks (256 wide) fit.
    On x86 with AVX2 the K-quant kernels round differently for other batch shapes, so that row is not zero
    there (tiny on this model: SmolLM2's figures are in the README); Q4_0's repacked kernels round alike
    on this tiny model (0)."""
    from flipcheck.compressors.pipeline import compress
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate
    from flipcheck.tiny import build_llama

    parent = save_model(build_llama(len(tiny_tokenizer), seed=0, hidden_size=256, intermediate_size=512,
                                    num_attention_heads=8, num_key_value_heads=8), tiny_tokenizer, tmp_path / "p", {"parent": None})
    q, q8 = tmp_path / "q", tmp_path / "q8"
    compress(str(parent), [("gguf", {"type": quant})], out=q)
    compress(str(parent), [("gguf", {"type": "Q8_0"})], out=q8)
    report = evaluate(str(q), str(q8), tasks="tiny_letters,tiny_sentences", include_path=str(task_dir),
                      engine_floor=True, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert report["parent"]["engine"]["name"] == "llama.cpp" and "layout" not in report["parent"]["engine"]
    dequant, whole = report["noise_floor"]
    assert dequant["engine"]["name"] == "transformers"
    assert whole["name"] == "noise floor: llama.cpp, each sequence whole (same file)"
    assert whole["engine"]["name"] == "llama.cpp" and whole["engine"]["layout"] == "whole"
    assert whole["engine"]["dtype"] == quant
    kl = whole["micro"]["kl_vocab"]["mean"]
    assert -1e-6 < kl < 1e-3, kl  # the batch layout alone moves the distributions by little, if at all (the top-K + tail estimate can dip below 0)
    if quant == "Q4_K_M" and "AVX2 = 1" in _kernels():  # ... and on these kernels it does move some answers'
        assert whole["micro"]["kl_options"]["max"] > 0  # distributions over options (1e-13 on this tiny model)
    assert whole["micro"]["flips"] <= 0.1
    assert report["children"][0]["micro"]["kl_vocab"]["mean"] > kl  # less than a real compression step
    assert "each sequence whole" in (tmp_path / "run" / "report.md").read_text()


def test_llamacpp_layouts_agree_on_f32(f32_gguf, tiny_tokenizer):
    """On a float32 file no kernel quantizes activations: the two layouts give the same log-probs."""
    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine
    from flipcheck.evaluation.lm import FlipLM

    items = _requests(tiny_tokenizer)
    scores = {}
    for layout in ("prefix", "whole"):
        engine = LlamaCppEngine(f32_gguf, layout=layout)
        try:
            scores[layout] = FlipLM(engine, tiny_tokenizer)._score(items, disable_tqdm=True)
        finally:
            engine.close()
    worst = max(float(np.abs(a.own.token_logp - b.own.token_logp).max())
                for a, b in zip(scores["prefix"], scores["whole"], strict=True))
    assert worst < 1e-4, worst
    with pytest.raises(FlipcheckError, match="allowed are prefix, whole"):
        LlamaCppEngine(f32_gguf, layout="sideways")
