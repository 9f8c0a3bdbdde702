"""Divergence over generations with a llama.cpp child (real llama-cpp-python, GGUF files written here):
the same weights never diverge from the transformers parent, and a GGUF of a child altered at one known
step diverges exactly there."""

from __future__ import annotations

import numpy as np
import pytest

from flipcheck.evaluation import generations as G
from flipcheck.evaluation.lm import FlipLM

pytest.importorskip("llama_cpp", reason="the llama.cpp engine tests need flipcheck[llamacpp] (make test installs it)")

from test_generations import _altered_at, _instances, _pick_k, _rows  # noqa: E402


def _gguf(model, tok, folder):
    from flipcheck.compressors.gguf_convert import write_gguf

    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return write_gguf(model, tok, folder / "model-F32.gguf")


def test_f32_gguf_on_llamacpp_never_diverges_from_the_transformers_parent(tiny_model_dir, task_dir, tmp_path,
                                                                          tiny_model, tiny_tokenizer):
    from flipcheck.orchestrate.evaluate import evaluate

    gguf = _gguf(tiny_model, tiny_tokenizer, tmp_path / "gguf")
    report = evaluate(str(tiny_model_dir), str(gguf), tasks="tiny_sums", include_path=str(task_dir),
                      cache_dir=tmp_path / "cache", out=tmp_path / "run", engine_floor=True)
    child = report["children"][0]
    assert child["engine"]["name"] == "llama.cpp"
    g = child["tasks"]["tiny_sums"]["generation"]
    assert g["identical"] == 1.0 and set(g["survival"]) == {1.0} and g["tf_mismatch"] == 0.0
    assert g["termination_P"] == g["termination_C"]
    (floor,) = report["noise_floor"]  # the engine floor row gets the same figures
    assert floor["tasks"]["tiny_sums"]["generation"]["identical"] == 1.0


def test_llamacpp_child_altered_at_a_known_step_diverges_exactly_there(tiny_model, tiny_tokenizer, tmp_path):
    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine

    reqs = _instances()
    target = 2
    k = _pick_k(tiny_model, tiny_tokenizer, reqs[target])
    child, parent_gen = _altered_at(tiny_model, tiny_tokenizer, reqs[target], k)
    engine = LlamaCppEngine(_gguf(child, tiny_tokenizer, tmp_path / "altered"))
    try:
        p = FlipLM(tiny_model, tiny_tokenizer, batch_size=4, progress=False)
        p.generate_until(reqs)
        c = FlipLM(engine, tiny_tokenizer, batch_size=4, progress=False, reference=p.records)
        c.generate_until(reqs)
    finally:
        engine.close()
    rows = _rows(len(reqs))
    G.attach(rows, p.records, c.records)
    g = rows[target].generation
    assert g["first_divergent_token"] == k
    miss = np.asarray(c.records[("sums", target, 0)].tf_miss)
    assert not miss[:k].any() and miss[k]


def test_llamacpp_generation_ends_on_the_files_end_of_generation_token(tiny_model, tiny_tokenizer, tmp_path):
    """A GGUF whose metadata names as EOS a token the model writes after its first: with no EOS ids from
    flipcheck (SmolLM2's tokenizer names another EOS than the end-of-turn token its model writes), the
    greedy generation still ends there, that token kept, as llama.cpp's own generation does; the same file
    with its EOS untouched runs to the token limit."""
    from gguf import GGUFReader

    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine

    path = _gguf(tiny_model, tiny_tokenizer, tmp_path / "eog")
    ctx = tiny_tokenizer("3 4 =")["input_ids"]
    engine = LlamaCppEngine(path)
    try:
        (full,) = engine.generate([ctx], 6, lambda toks: False, set())
    finally:
        engine.close()
    assert len(full) == 6, full
    j = next(j for j in range(1, 6) if full[j] not in full[:j])  # its first appearance ends the generation
    reader = GGUFReader(str(path), "r+")
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = full[j]
    reader.data.flush()
    del reader
    engine = LlamaCppEngine(path)
    try:
        assert full[j] in engine.eog
        (cut,) = engine.generate([ctx], 6, lambda toks: False, set())
    finally:
        engine.close()
    assert cut == full[: j + 1]
