"""GGUF children made with llama.cpp's own quantizer, and flipcheck's HF -> GGUF writer checked against
llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python source distribution)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("llama_cpp", reason="GGUF children need flipcheck[llamacpp] (make test installs it)")

from flipcheck.cli import app  # noqa: E402
from flipcheck.evaluation.engines.llamacpp import gguf_file_type  # noqa: E402

runner = CliRunner()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "IQ4_XS", "F16"])
def test_compress_gguf_types(tiny_model_dir, tmp_path, qtype):
    out = tmp_path / qtype
    res = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "gguf", "--set", f"type={qtype}",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    (gguf,) = out.glob("*.gguf")
    assert gguf_file_type(gguf) == qtype
    prov = json.loads((out / "flipcheck.json").read_text())
    assert prov["parent"] == str(Path(tiny_model_dir).resolve()) and prov["gguf"] == gguf.name
    assert prov["recipe"] == [{"method": "gguf", "settings": {"type": qtype, "layers": None}}]
    assert prov["weights"][gguf.name]["size"] == gguf.stat().st_size  # the fingerprint is bound to the file
    report = prov["reports"][0]
    expected = {"Q8_0": 8.5, "F16": 16.0}.get(qtype)
    if expected:
        assert report["bits_per_weight"] == pytest.approx(expected)
    else:
        assert 4.0 < report["bits_per_weight"] < 6.5  # K/IQ blocks; llama.cpp falls back where 128 < 256


def test_bad_gguf_type_is_one_line_exit_2(tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "gguf", "--set", "type=Q4_K_X",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "Q4_K_M" in res.output and "IQ4_XS" in res.output
    assert not (tmp_path / "x").exists()


def test_nothing_follows_a_gguf_step(tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["compress", str(tiny_model_dir), "-m", "gguf", "-m", "noise", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "gguf" in res.output


def test_wanda_then_gguf_keeps_the_zeros(tiny_model_dir, tmp_path, tiny_tokenizer):
    from flipcheck.compressors.pipeline import compress
    from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine

    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(f"The cat {i} saw a red ball and ran after it slowly." for i in range(64)))
    res = compress(str(tiny_model_dir), [("wanda", {"sparsity": 0.5}), ("gguf", {"type": "F32"})],
                   out=tmp_path / "w50", calibration={"source": str(cal), "samples": 8, "seq_len": 32})
    assert res.reports[-1].sparsity == pytest.approx(0.5, abs=0.02)
    (gguf,) = (tmp_path / "w50").glob("*.gguf")
    engine = LlamaCppEngine(gguf)
    try:  # the GGUF holds the pruned weights: its logits are the in-memory child's
        import torch

        ids = tiny_tokenizer("The cat saw a red ball")["input_ids"]
        got = engine._logits_at(ids, list(range(len(ids))))
        with torch.no_grad():
            want = res.model(torch.tensor([ids])).logits[0].float()
        assert float((got - want).abs().max()) < 1e-4
    finally:
        engine.close()


def test_sweep_over_gguf_types(tiny_model_dir, task_dir, tmp_path):
    from flipcheck.orchestrate.recipe import sweep

    report = sweep(str(tiny_model_dir), "gguf", {"type": ["Q8_0", "Q4_0"]}, tasks=["tiny_letters"],
                   include_path=str(task_dir), out=tmp_path / "run", cache_dir=tmp_path / "cache")
    children = report["children"]
    assert [c["engine"]["dtype"] for c in children] == ["Q8_0", "Q4_0"]
    assert all(c["engine"]["name"] == "llama.cpp" for c in children)
    kl = [c["micro"]["kl_vocab"]["mean"] for c in children]
    assert kl[0] < kl[1]  # 8 bits drift less than 4
    again = sweep(str(tiny_model_dir), "gguf", {"type": ["Q8_0", "Q4_0"]}, tasks=["tiny_letters"],
                  include_path=str(task_dir), out=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert [c["micro"]["kl_vocab"]["mean"] for c in again["children"]] == kl  # reused, not remade


# ------------------------------------------------------------------------------------------------
# flipcheck's writer against llama.cpp's own converter, on the real SmolLM2


def _reference_converter(tmp_path_factory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py and its modules, from the llama-cpp-python sdist (pip download)."""
    import llama_cpp

    root = tmp_path_factory.mktemp("llamacpp_src")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                          "-d", str(root), f"llama-cpp-python=={llama_cpp.__version__}"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"llama-cpp-python source distribution not downloadable: {res.stderr.strip()[-200:]}")
    (sdist,) = root.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   any(p in m.name for p in ("convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        tar.extractall(root, members=members, filter="data")
    (script,) = root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")
    return script.parent


def test_writer_equals_llamacpp_converter_on_smollm2(smollm2_dir, tmp_path_factory):
    """Same tensors (bit for bit), same vocabulary, merges and special tokens, same tokenization by
    llama.cpp, same logits. llama.cpp's converter takes SentencePiece or LlamaHF vocabularies first for a
    Llama; SmolLM2 is byte-level BPE, so the reference is run on its BPE path (its own _set_vocab_gpt2)."""
    from gguf import GGUFReader
    from llama_cpp import Llama

    from flipcheck.compressors.gguf_convert import write_gguf
    from flipcheck.models import load_model, load_tokenizer

    src = _reference_converter(tmp_path_factory)
    out = tmp_path_factory.mktemp("gguf_cmp")
    ref_path, ours_path = out / "ref.gguf", out / "ours.gguf"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[2:]\n"
            "import convert_hf_to_gguf as conv\nfrom conversion.llama import LlamaModel\n"
            "LlamaModel.set_vocab = LlamaModel._set_vocab_gpt2\nconv.main()\n")
    res = subprocess.run([sys.executable, "-c", code, str(src), str(smollm2_dir), "--outtype", "f32",
                          "--outfile", str(ref_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    tok = load_tokenizer(str(smollm2_dir))
    write_gguf(load_model(str(smollm2_dir)), tok, ours_path)

    ref, ours = GGUFReader(str(ref_path)), GGUFReader(str(ours_path))
    ref_t, our_t = {t.name: t for t in ref.tensors}, {t.name: t for t in ours.tensors}
    assert set(ref_t) == set(our_t)
    for name, t in ref_t.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(our_t[name].data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "llama.block_count", "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert ref.fields[key].contents() == ours.fields[key].contents(), key

    texts = ["The capital of France is Paris.", "In 1492, 3.14159 and 12345 apples; naïve café — ok?\n\n  x",
             "def f(x):\n    return x**2  # square"]
    models = {n: Llama(model_path=str(p), logits_all=True, n_ctx=256, verbose=False, type_k=0, type_v=0)
              for n, p in (("ref", ref_path), ("ours", ours_path))}
    try:
        for text in texts:
            ids = {n: m.tokenize(text.encode(), add_bos=False, special=False) for n, m in models.items()}
            assert ids["ref"] == ids["ours"] == tok(text, add_special_tokens=False)["input_ids"]
        ids = tok(texts[1])["input_ids"]
        logits = {}
        for n, m in models.items():
            m.reset()
            m.eval(ids)
            logits[n] = np.array(m.scores[: len(ids)])
        assert np.array_equal(logits["ref"], logits["ours"])
    finally:
        for m in models.values():
            m.close()


def test_per_layer_tensor_types_reach_llama_cpps_overrides(tiny_model_dir, tmp_path):
    """--set layers=1:Q8_0 on a Q4_0 child: every 2-D tensor of decoder layer 1 is Q8_0 in the file
    llama.cpp wrote (its per-tensor overrides), layer 0's are Q4_0, and bits/weight lies between."""
    import gguf

    out = tmp_path / "mix"
    res = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "gguf", "--set", "type=Q4_0",
                              "--set", "layers=1:Q8_0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (path,) = out.glob("*.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
             if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2}
    assert types and all(v == ("Q8_0" if k.startswith("blk.1.") else "Q4_0") for k, v in types.items()), types
    bits = json.loads((out / "flipcheck.json").read_text())["reports"][0]["bits_per_weight"]
    assert 4.5 < bits < 8.5  # Q4_0 is 4.5 bits per weight, Q8_0 8.5: half the Linears each
    bad = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "gguf", "--set", "layers=0:Q4_K_M",
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "tensor type 'Q4_K_M' is not allowed; allowed: F32" in " ".join(bad.output.split())
    far = runner.invoke(app, ["compress", str(tiny_model_dir), "--method", "gguf", "--set", "layers=5:Q8_0",
                              "--out", str(tmp_path / "far")])
    assert far.exit_code == 2 and "names layer 5, but the model has 2 decoder layers" in " ".join(far.output.split())
