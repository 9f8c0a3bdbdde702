"""llama.cpp's KL statistics block: figures against hand computations, the printed lines, and the
block of a real text evaluation against an independent numpy computation of the same tokens."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from flipcheck.evaluation.kld_block import (
    format_block,
    kl_by_parent_confidence,
    llama_block,
    mean_and_uncertainty,
)

CTX = 24


def _percentile(values, fraction):
    """llama.cpp's percentile, written out: linear interpolation at rank fraction * (n - 1) of the sorted values."""
    v = sorted(values)
    p = fraction * (len(v) - 1)
    i = int(p)
    p -= i
    return (1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)]


def test_figures_by_hand():
    kl = np.array([0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 0.005])  # 12 tokens
    dp = np.array([-0.5, -0.1, 0.0, 0.0, 0.05, 0.1, 0.2, -0.2, 0.3, 0.0, -0.05, 0.01])
    agree = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    window = np.repeat(np.arange(4), 3)
    b = llama_block(kl, dp, agree, window, n_boot=200, seed=0)
    n = 12
    mean = sum(kl) / n
    assert b["kld"]["mean"] == pytest.approx(mean)
    assert b["kld"]["mean_unc"] == pytest.approx(math.sqrt((sum(x * x for x in kl) / n - mean**2) / (n - 1)))
    assert b["kld"]["max"] == 5.12 and b["kld"]["min"] == 0.0
    s = sorted(kl)
    assert b["kld"]["median"] == pytest.approx((s[5] + s[6]) / 2)
    for key, f in (("p99.9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p10", 0.10), ("p5", 0.05),
                   ("p1", 0.01), ("p0.1", 0.001)):
        assert b["kld"][key] == pytest.approx(_percentile(kl, f)), key
    for key, f in (("p75", 0.75), ("p25", 0.25)):
        assert b["dp"][key] == pytest.approx(_percentile(dp, f)), key
    msq = sum(x * x for x in dp) / n
    u4 = math.sqrt((sum(x**4 for x in dp) / n - msq**2) / (n - 1))
    assert b["rms_dp"]["value"] == pytest.approx(math.sqrt(msq))
    assert b["rms_dp"]["unc"] == pytest.approx(0.5 / math.sqrt(msq) * u4)
    assert b["same_top"]["value"] == pytest.approx(10 / 12)
    assert b["same_top"]["unc"] == pytest.approx(math.sqrt((10 / 12) * (2 / 12) / 11))
    for key in ("p99.9", "p99", "p95", "p90", "p10", "p5", "p1", "p0.1"):
        lo, hi = b["kld"]["ci"][key]
        assert lo <= hi and s[0] <= lo and hi <= s[-1]
    assert mean_and_uncertainty(np.ones(5) * 0.3)[1] == 0.0  # n <= 10 or no variance: llama.cpp prints 0


def test_printed_lines_follow_llama_cpp():
    kl = np.linspace(0, 1, 101)
    dp = np.linspace(-0.5, 0.5, 101)
    lines = format_block(llama_block(kl, dp, np.ones(101, bool), np.arange(101) // 10, n_boot=0))
    assert lines[0] == "====== KL divergence statistics ======"
    assert lines[1] == f"Mean    KLD: {0.5:10.6f} ± {math.sqrt((np.mean(kl**2) - 0.25) / 100):10.6f}"
    names = [ln.split(" KLD:")[0] for ln in lines[2:13]]
    assert names == ["Maximum", "99.9%  ", "99.0%  ", "95.0%  ", "90.0%  ", "Median ", "10.0%  ", " 5.0%  ",
                     " 1.0%  ", " 0.1%  ", "Minimum"]
    assert lines[3] == f"99.9%   KLD: {_percentile(kl, 0.999):10.6f}"
    assert lines[14] == "====== Token probability statistics ======"
    assert lines[15].startswith("Mean    Δp:  0.000 ± ") and lines[15].endswith(" %")
    assert [ln.split(" Δp:")[0] for ln in lines[16:29]] == [
        "Maximum", "99.9%  ", "99.0%  ", "95.0%  ", "90.0%  ", "75.0%  ", "Median ", "25.0%  ", "10.0%  ", " 5.0%  ",
        " 1.0%  ", " 0.1%  ", "Minimum"]
    assert lines[16] == "Maximum Δp: 50.000%"
    assert lines[-2].startswith("RMS Δp    : ") and lines[-1] == "Same top p: 100.000 ± 0.000 %"


def test_kl_by_parent_confidence_by_hand():
    kl = np.array([1.0, 2.0, 0.5, 0.1, 0.0])
    p_top = np.array([0.1, 0.15, 0.5, 0.97, 1.0])
    b = kl_by_parent_confidence(kl, p_top)
    by = {tuple(x["p_top"]): x for x in b}
    assert by[(0.0, 0.2)]["tokens"] == 2 and by[(0.0, 0.2)]["kl_mean"] == 1.5
    assert by[(0.0, 0.2)]["kl_share"] == pytest.approx(3.0 / 3.6)
    assert by[(0.99, 1.0)]["tokens"] == 1  # the last bucket is closed: p = 1 counts
    assert sum(x["tokens"] for x in b) == 5 and by[(0.2, 0.4)]["kl_mean"] is None


def test_text_evaluation_block_matches_numpy(tmp_path, tiny_model, tiny_tokenizer):
    from conftest import corpus
    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.evaluation.corpus import Corpus, scored_range, windows
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate

    save_model(tiny_model, tiny_tokenizer, tmp_path / "parent", {"parent": None})
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.3, seed=1), None)
    save_model(child, tiny_tokenizer, tmp_path / "child", {"parent": str(tmp_path / "parent")})
    text = "\n".join(corpus()[40:100])
    (tmp_path / "text.txt").write_text(text)
    report = evaluate(str(tmp_path / "parent"), [str(tmp_path / "child")], tasks=[], texts=[str(tmp_path / "text.txt")],
                      ctx=CTX, scoring="half", kl="exact", cache_dir=tmp_path / "cache", out=tmp_path / "run")
    fig = report["children"][0]["corpus"]["text.txt"]
    kls, dps, agree, ptop = [], [], [], []
    for w in windows(tiny_tokenizer, Corpus("x", "x", (text,)), CTX):
        ids = torch.from_numpy(w)[None]
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(ids).logits[0].double(), -1).numpy()
            lc = torch.log_softmax(child(ids).logits[0].double(), -1).numpy()
        s, e = scored_range(len(w), "half")
        lp, lc, t = lp[s:e], lc[s:e], w[s + 1 : e + 1]
        kls.append((np.exp(lp) * (lp - lc)).sum(-1))
        r = np.arange(len(t))
        dps.append(np.exp(lc[r, t]) - np.exp(lp[r, t]))
        agree.append(lp.argmax(-1) == lc.argmax(-1))
        ptop.append(np.exp(lp.max(-1)))
    kl, dp, ag, pt = (np.concatenate(x) for x in (kls, dps, agree, ptop))
    b = fig["llama_cpp"]
    assert b["tokens"] == kl.size
    assert b["kld"]["mean"] == pytest.approx(kl.mean(), rel=1e-4)
    for key, f in (("p99", 0.99), ("p90", 0.90), ("p10", 0.10)):
        assert b["kld"][key] == pytest.approx(_percentile(kl, f), rel=1e-3, abs=1e-7), key
    assert b["dp"]["p75"] == pytest.approx(_percentile(dp, 0.75), abs=1e-5)
    assert b["rms_dp"]["value"] == pytest.approx(np.sqrt((dp**2).mean()), rel=1e-4)
    assert b["same_top"]["value"] == pytest.approx(ag.mean())
    buckets = fig["kl_by_p_top"]
    want = kl_by_parent_confidence(kl, pt)
    assert [x["tokens"] for x in buckets] == [x["tokens"] for x in want]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "====== KL divergence statistics ======" in md and "Same top p:" in md and "parent top p" in md
    assert "====== Token probability statistics ======" in (tmp_path / "run" / "report.html").read_text()
