"""Streaming corpora: tokenized in pieces, scored and cached in chunks of windows, resumed per chunk;
figures equal to scoring the corpus in one piece."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import corpus
from flipcheck.compressors.noise import NoiseConfig, apply_noise
from flipcheck.evaluation import corpora as corpora_mod
from flipcheck.evaluation import corpus as corpus_mod
from flipcheck.evaluation.corpus import Corpus, _encode_pieces, adds_bos, iter_windows
from flipcheck.models import save_model
from flipcheck.orchestrate.evaluate import evaluate

TEXT = "\n".join(corpus()) + "\n\nnaïve café — déjà vu, 12345 et 3.14159!\n\n   spaced   out\ttabs\n" * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("stream")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    m = copy.deepcopy(tiny_model)
    apply_noise(m, NoiseConfig(sigma=0.3, seed=1), None)
    save_model(m, tiny_tokenizer, root / "child", {"parent": str(root / "parent")})
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.mark.parametrize("piece", [17, 64, 257, 1000])
def test_pieces_tokenize_like_the_whole_text(tiny_tokenizer, piece):
    whole = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = list(_encode_pieces(tiny_tokenizer, TEXT, piece_chars=piece))
    assert len(pieces) > 1
    assert [t for p in pieces for t in p] == whole


def test_pieces_tokenize_like_the_whole_text_on_smollm2(smollm2_dir):
    from flipcheck.models import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    whole = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert [t for p in _encode_pieces(tok, TEXT, piece_chars=101) for t in p] == whole


def test_windows_are_the_whole_stream_cut_every_ctx(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 50)
    docs = (TEXT[:900], TEXT[900:2500])
    ids = tiny_tokenizer(docs[0], add_special_tokens=False)["input_ids"] + \
        tiny_tokenizer("\n\n", add_special_tokens=False)["input_ids"] + \
        tiny_tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    got = list(iter_windows(tiny_tokenizer, Corpus("x", "x", docs), 32))
    assert not adds_bos(tiny_tokenizer)
    assert len(got) == len(ids) // 32
    assert all(np.array_equal(w, ids[i * 32 : (i + 1) * 32]) for i, w in enumerate(got))
    assert len(list(iter_windows(tiny_tokenizer, Corpus("x", "x", docs), 32, limit=3))) == 3


def _figures(report):
    fig = dict(report["children"][0]["corpus"]["text.txt"])
    fig.pop("source", None)
    return fig


@pytest.mark.parametrize("kl", ["topk", "exact"])
def test_chunked_scoring_equals_one_chunk(models, tmp_path, monkeypatch, kl):
    runs = {}
    for chunk in (3, 10_000):
        monkeypatch.setattr(corpora_mod, "CHUNK_WINDOWS", chunk)
        monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 300 if chunk == 3 else 1 << 20)
        runs[chunk] = evaluate(str(models / "parent"), str(models / "child"), tasks=[], texts=[str(models / "text.txt")],
                               ctx=24, kl=kl, cache_dir=tmp_path / f"cache{chunk}")
    assert _figures(runs[3]) == _figures(runs[10_000])
    assert runs[3]["children"][0]["corpus"]["text.txt"]["tokens"] > 3 * 24 * 3  # several chunks were scored


def test_an_interrupted_corpus_resumes_at_its_first_unfinished_chunk(models, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora_mod, "CHUNK_WINDOWS", 4)
    real = corpora_mod.score_child
    calls = []

    def interrupted(*a, **k):
        calls.append(k["first_window"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpora_mod, "score_child", interrupted)
    args = (str(models / "parent"), str(models / "child"))
    kw = {"tasks": [], "texts": [str(models / "text.txt")], "ctx": 24, "cache_dir": tmp_path / "cache"}
    with pytest.raises(KeyboardInterrupt):
        evaluate(*args, **kw)
    assert calls == [0, 4, 8]
    calls.clear()
    monkeypatch.setattr(corpora_mod, "score_child", lambda *a, **k: calls.append(k["first_window"]) or real(*a, **k))
    resumed = evaluate(*args, **kw)
    assert calls and calls[0] == 8  # the two finished chunks were read from the cache
    fresh = evaluate(*args, **{**kw, "cache_dir": tmp_path / "fresh"})
    assert _figures(resumed) == _figures(fresh)
