"""Calibration samples: every local source, the Hugging Face path, determinism and errors."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import (
    build_calibration,
    concat_tokens,
    parse_hf_source,
    read_texts,
    split_paragraphs,
)
from flipcheck.errors import FlipcheckError

PARAGRAPHS = [
    "The cat saw a red ball and ran after it slowly.",
    "Question: What color is the dog?\nAnswer: The dog is blue.",
    "1 2 = 3 and 4 5 = 9, said the horse to the mouse.",
]


def joined(docs: list[str]) -> str:
    return "\n\n".join(docs)


def assert_windows_of(cal, tokenizer, docs, samples, seq_len):
    """Each sample is seq_len consecutive tokens of the documents joined by blank lines."""
    ids = cal.input_ids
    assert ids.dtype == torch.long and tuple(ids.shape) == (samples, seq_len)
    text = joined(docs)
    for row in ids:
        assert tokenizer.decode(row.tolist()) in text
    assert cal.describe()["tokens"] == samples * seq_len


def test_split_paragraphs_by_blank_lines():
    assert split_paragraphs("a\nb\n\n\n  c  \n\n   \nd\n") == ["a\nb", "c", "d"]
    assert split_paragraphs("one line\nanother line\n") == ["one line\nanother line"]  # whole file
    assert split_paragraphs("\n\n") == []


def test_txt_source(tmp_path, tiny_tokenizer):
    f = tmp_path / "calib.txt"
    f.write_text(joined(PARAGRAPHS) + "\n")
    assert read_texts(str(f)) == PARAGRAPHS
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source=str(f), samples=5, seq_len=8, seed=3))
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS, 5, 8)
    assert cal.config.source == str(f) and cal.tokenizer is tiny_tokenizer


def test_jsonl_source(tmp_path, tiny_tokenizer):
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(PARAGRAPHS)) + "\n")
    assert read_texts(str(f)) == PARAGRAPHS
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source=str(f), samples=4, seq_len=10))
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS, 4, 10)


def test_folder_source_reads_txt_and_jsonl_in_path_order(tmp_path, tiny_tokenizer):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": PARAGRAPHS[2]}) + "\n")
    (tmp_path / "a.txt").write_text(joined(PARAGRAPHS[:2]))
    (tmp_path / "notes.md").write_text("ignored")
    assert read_texts(str(tmp_path)) == PARAGRAPHS
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source=str(tmp_path), samples=3, seq_len=12))
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS, 3, 12)


def test_tokens_are_the_documents_joined_by_blank_lines(tiny_tokenizer):
    ids = concat_tokens(tiny_tokenizer, PARAGRAPHS)
    assert tiny_tokenizer.decode(ids.tolist()) == joined(PARAGRAPHS)


def test_texts_argument_replaces_the_source(tiny_tokenizer):
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(samples=2, seq_len=8), texts=PARAGRAPHS)
    assert cal.config.source == "texts"
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS, 2, 8)


def test_windows_are_deterministic_per_seed(tiny_tokenizer):
    docs = PARAGRAPHS * 20

    def ids(seed):
        return build_calibration(tiny_tokenizer, CalibrationConfig(samples=8, seq_len=16, seed=seed), texts=docs).input_ids

    assert torch.equal(ids(0), ids(0))
    assert not torch.equal(ids(0), ids(1))
    # the offsets come from torch's generator seeded with `seed`: reproduce them independently
    tokens = tiny_tokenizer(joined(docs), add_special_tokens=False)["input_ids"]
    starts = torch.randint(0, len(tokens) - 16 + 1, (8,), generator=torch.Generator().manual_seed(5))
    expected = torch.tensor([tokens[s : s + 16] for s in starts.tolist()])
    assert torch.equal(ids(5), expected)


def test_too_short_names_the_counts(tiny_tokenizer):
    n = len(concat_tokens(tiny_tokenizer, PARAGRAPHS[:1]))
    with pytest.raises(FlipcheckError) as err:
        build_calibration(tiny_tokenizer, CalibrationConfig(samples=2, seq_len=512), texts=PARAGRAPHS[:1])
    assert f"has {n} tokens" in str(err.value) and "needs at least 512" in str(err.value)
    with pytest.raises(FlipcheckError, match="has 0 tokens"):
        build_calibration(tiny_tokenizer, CalibrationConfig(seq_len=8), texts=[])


def test_bad_sources(tmp_path, tiny_tokenizer):
    with pytest.raises(FlipcheckError, match="neither 'demo'"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(FlipcheckError, match=r"unsupported type '\.csv'; allowed: \.txt, \.jsonl"):
        read_texts(str(tmp_path / "data.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlipcheckError, match="no .txt or .jsonl files"):
        read_texts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(FlipcheckError, match=r"bad\.jsonl:2: .*\"text\" field \(found: body\)"):
        read_texts(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(FlipcheckError, match=r"bad\.jsonl:1: not valid JSON"):
        read_texts(str(bad))


def test_hf_source_parsing():
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1:train") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hf_source("hf:allenai/c4:en") == ("allenai/c4", "en", "train")
    assert parse_hf_source("hf:user/data") == ("user/data", None, "train")
    for bad in ("hf:", "hf:a:b:c:d", "hf:name::train"):
        with pytest.raises(FlipcheckError, match="hf:NAME"):
            parse_hf_source(bad)


def test_hf_source_offline_says_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FlipcheckError) as err:
        read_texts("hf:flipcheck-no-such-dataset:default:train")
    msg = str(err.value)
    assert "no network" in msg and "local .txt or .jsonl file" in msg


def test_hf_source_loads_through_datasets(tmp_path, monkeypatch, tiny_tokenizer):
    """The hf: path runs datasets.load_dataset for real, here on a local data folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS))
    assert read_texts(f"hf:{data}") == PARAGRAPHS
    (data / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache2")
    with pytest.raises(FlipcheckError, match=r"no 'text' column \(columns: body\)"):
        read_texts(f"hf:{data}")


def test_demo_source(monkeypatch, tiny_tokenizer):
    fake = types.ModuleType("flipcheck.demo")
    fake.demo_texts = lambda: PARAGRAPHS * 3
    monkeypatch.setitem(sys.modules, "flipcheck.demo", fake)
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source="demo", samples=3, seq_len=8))
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS * 3, 3, 8)
    monkeypatch.setitem(sys.modules, "flipcheck.demo", None)  # the module is missing
    with pytest.raises(FlipcheckError, match="needs flipcheck.demo"):
        read_texts("demo")


def test_real_demo_texts_calibrate(tiny_tokenizer):
    demo = pytest.importorskip("flipcheck.demo")
    docs = demo.demo_texts()
    assert docs and all(isinstance(d, str) for d in docs)
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source="demo", samples=4, seq_len=16))
    assert_windows_of(cal, tiny_tokenizer, docs, 4, 16)
