"""Build the calibration samples every data-driven step of a recipe shares.

Text comes from one source (:class:`~flipcheck.compressors.calibration.CalibrationConfig`):

- ``demo``: the offline demo task's text (:func:`flipcheck.demo.demo_texts`);
- a local ``.txt`` file (one document per blank-line-separated paragraph; a file without blank
  lines is one document), a ``.jsonl`` file (one document per line, in its ``"text"`` field), or a
  folder of such files (read in sorted path order);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset through ``datasets.load_dataset`` (split
  ``train`` by default), its ``"text"`` column. This needs network unless the dataset is cached.

The documents are tokenized without special tokens and concatenated with the tokens of "\\n\\n"
between them; `samples` windows of `seq_len` tokens are cut at offsets drawn uniformly from
[0, T - seq_len] by a generator seeded with `seed` (the GPTQ reference recipe), so the same
config and text give the same samples. Windows may overlap when the text is short.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from flipcheck.compressors.calibration import Calibration, CalibrationConfig
from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
SEPARATOR = "\n\n"


def build_calibration(
    tokenizer,
    config: CalibrationConfig | None = None,
    *,
    texts: list[str] | None = None,
) -> Calibration:
    """Tokenized calibration windows (samples x seq_len, int64) from `config.source` or `texts`.

    `texts`, when given, replaces the source (reported as source 'texts').
    """
    config = config or CalibrationConfig()
    if texts is not None:
        config = config.model_copy(update={"source": "texts"})
        docs = list(texts)
    else:
        docs = read_texts(config.source)
    ids = concat_tokens(tokenizer, docs)
    windows = cut_windows(ids, config.samples, config.seq_len, config.seed, source=config.source)
    return Calibration(tokenizer=tokenizer, input_ids=windows, config=config)


# --------------------------------------------------------------------------- sources


def read_texts(source: str) -> list[str]:
    """The documents of a calibration source (see the module docstring for the forms)."""
    if source == "demo":
        return _demo_texts()
    if source.startswith("hf:"):
        return _hf_texts(source)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FlipcheckError(f"calibration source {source!r}: the folder holds no .txt or .jsonl files")
        docs: list[str] = []
        for f in files:
            docs.extend(_file_texts(f))
        return docs
    if path.is_file():
        return _file_texts(path)
    raise FlipcheckError(
        f"calibration source {source!r} is neither 'demo', an existing .txt/.jsonl file or folder, "
        "nor 'hf:NAME[:CONFIG[:SPLIT]]' (e.g. hf:wikitext:wikitext-2-raw-v1:train)"
    )


def _demo_texts() -> list[str]:
    try:
        from flipcheck.demo import demo_texts
    except ImportError as err:
        raise FlipcheckError(
            "calibration source 'demo' needs flipcheck.demo, which this installation does not have "
            f"({err}); pass a local .txt or .jsonl file as the calibration source instead"
        ) from err
    return list(demo_texts())


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return split_paragraphs(path.read_text(encoding="utf-8"))
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    raise FlipcheckError(f"calibration file {str(path)!r}: unsupported type {path.suffix!r}; allowed: .txt, .jsonl")


def split_paragraphs(text: str) -> list[str]:
    """Documents of a .txt file: paragraphs separated by blank lines (stripped, empty ones dropped)."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return paragraphs


def _jsonl_texts(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FlipcheckError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise FlipcheckError(f"{path}:{lineno}: expected an object with a string \"text\" field (found: {keys})")
            if row["text"].strip():
                docs.append(row["text"])
    return docs


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split, default 'train')."""
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3 or any(p == "" for p in parts[1:]):
        raise FlipcheckError(f"calibration source {source!r}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:train")
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    return name, config, split


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hf_texts(source: str) -> list[str]:
    name, config, split = parse_hf_source(source)
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        why = "no network: Hugging Face offline mode is on" if _offline() else "the hub could not be reached or the dataset was not found"
        raise FlipcheckError(
            f"calibration source {source!r}: could not load the dataset ({why}; {type(err).__name__}: {msg}). "
            "Save the text to a local .txt or .jsonl file and pass its path as the calibration source."
        ) from err
    if "text" not in ds.column_names:
        raise FlipcheckError(f"calibration source {source!r}: no 'text' column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


# --------------------------------------------------------------------------- tokens


def concat_tokens(tokenizer, docs: list[str]) -> torch.Tensor:
    """Token ids of the documents joined by the separator's tokens, as one int64 vector."""
    if not docs:
        return torch.zeros(0, dtype=torch.long)
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i:
            ids.extend(sep)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, *, source: str = "text") -> torch.Tensor:
    """`samples` windows of `seq_len` consecutive tokens at offsets ~ U[0, T - seq_len], seeded."""
    total = int(ids.numel())
    if total < seq_len:
        raise FlipcheckError(
            f"calibration source {source!r} has {total} tokens, but a sample of seq_len={seq_len} needs at least "
            f"{seq_len}; use more text or a smaller seq_len"
        )
    if total < samples * seq_len:
        log.warning(
            "calibration source %r has %d tokens, fewer than samples x seq_len = %d: windows will overlap",
            source, total, samples * seq_len,
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
