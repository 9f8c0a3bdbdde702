"""Calibration samples: every local source, the Hugging Face path, determinism and errors."""

from __future__ import annotations

import json

import pytest
import torch

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import (
    build_calibration,
    concat_tokens,
    default_source,
    parse_hf_source,
    read_texts,
    register_source,
    resolve_calibration,
    row_slice,
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
    with pytest.raises(FlipcheckError, match="neither an existing .txt/.jsonl file or folder"):
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
    assert parse_hf_source("hf:name::train[:10]") == ("name", None, "train[:10]")  # no config
    assert row_slice("train[:1000]") == ("train", 0, 1000) and row_slice("train[5:8]") == ("train", 5, 8)
    assert row_slice("train") is None and row_slice("train[:10%]") is None
    for bad in ("hf:", "hf:a:b:c:d", "hf:name:", "hf:name:cfg:"):
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


def test_named_source(monkeypatch, tiny_tokenizer):
    from flipcheck.compressors import calibration_data
    from flipcheck.demo import demo_texts

    monkeypatch.setattr(calibration_data, "_NAMED", {})
    # nothing imported the demo: its source is found through the package's entry point, as a flipcheck
    # child whose flipcheck.json names calibration_source "demo" needs in a fresh process
    assert read_texts("demo") == list(demo_texts())
    register_source("demo", lambda: PARAGRAPHS * 3)
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source="demo", samples=3, seq_len=8))
    assert_windows_of(cal, tiny_tokenizer, PARAGRAPHS * 3, 3, 8)


def test_the_core_does_not_import_the_demo():
    from pathlib import Path

    import flipcheck.compressors as pkg

    for f in Path(pkg.__file__).parent.glob("*.py"):
        assert "flipcheck.demo" not in f.read_text(), f.name


def test_default_source_follows_the_parent(tmp_path):
    from flipcheck.compressors.calibration import DEFAULT_SOURCE
    from flipcheck.models import write_json_atomic

    assert DEFAULT_SOURCE == "hf:wikitext:wikitext-2-raw-v1:train"
    assert default_source(None) == DEFAULT_SOURCE == default_source("meta-llama/Llama-3.2-1B")
    write_json_atomic(tmp_path / "flipcheck.json", {"calibration_source": "demo"})
    assert default_source(tmp_path) == "demo"
    assert resolve_calibration(CalibrationConfig(samples=4), tmp_path).source == "demo"
    assert resolve_calibration(CalibrationConfig(source="x.txt"), tmp_path).source == "x.txt"  # given wins
    assert CalibrationConfig().source is None


def test_default_calibration_offline_is_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch):
    """A real parent without a calibration source gets wikitext-2; offline that is one line naming
    the local alternatives, before the weights load, and the CLI exits 2."""
    from typer.testing import CliRunner

    from flipcheck.cli import app
    from flipcheck.compressors.pipeline import compress

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FlipcheckError) as err:
        compress(tiny_model_dir, [("wanda", {"sparsity": 0.5})], out=tmp_path / "child")
    msg = str(err.value)
    assert "\n" not in msg and "hf:wikitext:wikitext-2-raw-v1:train" in msg
    assert "no network" in msg and "local .txt or .jsonl file or a folder" in msg
    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "-m", "wanda", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "wikitext-2-raw-v1" in res.output
    assert not (tmp_path / "child").exists() and not (tmp_path / "c").exists()


def test_hf_row_slice_streams_only_those_rows(tmp_path, monkeypatch):
    """hf:FOLDER::train[2:5] reads rows 2..4 by streaming: the second data file, which is not
    valid JSON, is never opened (loading the whole split fails on it)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "ds"
    data.mkdir()
    rows = [f"row {i} of the calibration set." for i in range(10)]
    (data / "train-00000-of-00002.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (data / "train-00001-of-00002.jsonl").write_text("{this is not json\n")
    assert read_texts(f"hf:{data}::train[2:5]") == rows[2:5]
    assert read_texts(f"hf:{data}::train[:3]") == rows[:3]
    with pytest.raises(FlipcheckError, match="could not load the dataset"):
        read_texts(f"hf:{data}::train")


def test_real_demo_texts_calibrate(tiny_tokenizer):
    demo = pytest.importorskip("flipcheck.demo")
    docs = demo.demo_texts()
    assert docs and all(isinstance(d, str) for d in docs)
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(source="demo", samples=4, seq_len=16))
    assert_windows_of(cal, tiny_tokenizer, docs, 4, 16)
