"""Build the calibration samples every data-driven step of a recipe shares.

Text comes from one source (:class:`~flipcheck.compressors.calibration.CalibrationConfig`):

- none given: the source the parent's ``flipcheck.json`` names (``calibration_source``; the demo
  parent names ``demo``), else :data:`~flipcheck.compressors.calibration.DEFAULT_SOURCE`
  (wikitext-2 train, as llm-compressor's examples calibrate), see :func:`resolve_calibration`;
- a named source registered with :func:`register_source` (the demo registers ``demo``, its facts;
  this module does not import the demo);
- a local ``.txt`` file (one document per blank-line-separated paragraph; a file without blank
  lines is one document), a ``.jsonl`` file (one document per line, in its ``"text"`` field), or a
  folder of such files (read in sorted path order);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset (or a local folder of data files) through
  ``datasets.load_dataset`` (split ``train`` by default; ``hf:NAME::SPLIT`` leaves CONFIG out), its
  ``"text"`` column. A split sliced by rows, ``train[:1000]`` or ``train[500:1500]``, is streamed
  and only those rows are read; other forms (``train[:10%]``) go to ``datasets`` as they are. This
  needs network unless the dataset is cached or local.
- ``prompts:TASK[,TASK...][:INCLUDE_PATH]``: the prompts of lm-eval tasks (a local task folder, the
  packaged demo tasks, or lm-eval's own), each document's ``doc_to_text`` without its answer: in-domain
  text that works offline wherever the tasks do (``search`` and ``localize`` take it by default).

The documents are tokenized without special tokens and concatenated with the tokens of "\\n\\n"
between them; `samples` windows of `seq_len` tokens are cut at offsets drawn uniformly from
[0, T - seq_len] by a generator seeded with `seed` (the GPTQ reference recipe), so the same
config and text give the same samples. Windows may overlap when the text is short.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

import torch

from flipcheck.compressors.calibration import DEFAULT_SOURCE, Calibration, CalibrationConfig
from flipcheck.errors import FlipcheckError
from flipcheck.files import packaged_task_dir
from flipcheck.models import read_provenance

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
        config = resolve_calibration(config, None)
        docs = read_texts(config.source)
    ids = concat_tokens(tokenizer, docs)
    windows = cut_windows(ids, config.samples, config.seq_len, config.seed, source=config.source)
    return Calibration(tokenizer=tokenizer, input_ids=windows, config=config)


# --------------------------------------------------------------------------- sources

_NAMED: dict[str, Callable[[], list[str]]] = {}


def register_source(name: str, texts: Callable[[], list[str]]) -> None:
    """Make `name` a calibration source whose documents are ``texts()`` (the demo registers ``demo``)."""
    _NAMED[name] = texts


def default_source(parent: str | os.PathLike | None) -> str:
    """The calibration source for `parent` when none is given: the one its flipcheck.json names,
    else :data:`DEFAULT_SOURCE`."""
    prov = read_provenance(parent) if parent is not None and Path(parent).is_dir() else None
    named = (prov or {}).get("calibration_source")
    return named if isinstance(named, str) and named else DEFAULT_SOURCE


def evaluated_text_source(
    parent: str | os.PathLike | None, tasks: Sequence[str], include_path: str | os.PathLike | None = None,
    texts: Sequence[str] = (),
) -> tuple[str, str | None]:
    """(source, note) of the text to calibrate and probe on when the user gives none, for commands that
    evaluate tasks (search, localize): the source the parent's flipcheck.json names; else the prompts of
    the tasks being evaluated (never their answers), as ``demo --real`` does; else the first ``--text``
    corpus. Unlike :data:`DEFAULT_SOURCE` these need no network. The note says which, for the report."""
    own = default_source(parent)
    if own != DEFAULT_SOURCE:
        return own, None
    if tasks:
        source = prompts_source(list(tasks), include_path)
        return source, f"no calibration text given: the prompts of the evaluated tasks ({', '.join(tasks)}), answers left out"
    if texts:
        spec = texts[0]
        if spec.startswith("hf:") and spec.count(":") < 3:  # --text reads the test split by default
            spec = spec + ":" * (3 - spec.count(":")) + "test"
        return spec, f"no calibration text given: the first --text corpus ({texts[0]})"
    return DEFAULT_SOURCE, None


def resolve_calibration(config: CalibrationConfig | None, parent: str | os.PathLike | None) -> CalibrationConfig:
    """`config` with its source filled in for `parent` when it has none (:func:`default_source`)."""
    config = config or CalibrationConfig()
    if config.source is not None:
        return config
    return config.model_copy(update={"source": default_source(parent)})


def _named(source: str) -> Callable[[], list[str]] | None:
    """The text function of a named source (registered here or by another package's entry point)."""
    if source not in _NAMED:  # a named source another package provides (the demo's facts: "demo")
        for ep in entry_points(group="flipcheck.calibration_sources"):
            if ep.name == source:
                _NAMED[source] = ep.load()
    return _NAMED.get(source)


def _folder_files(path: Path, source: str) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FlipcheckError(f"calibration source {source!r}: the folder holds no .txt or .jsonl files")
    return files


def _not_a_source(source: str) -> FlipcheckError:
    named = ", ".join(repr(n) for n in sorted(_NAMED)) or "none registered"
    return FlipcheckError(
        f"calibration source {source!r} is neither an existing .txt/.jsonl file or folder, "
        f"'hf:NAME[:CONFIG[:SPLIT]]' (e.g. {DEFAULT_SOURCE}), nor a named source ({named})"
    )


def _unreachable(source: str, err: Exception) -> FlipcheckError:
    msg = str(err).splitlines()[0][:200] if str(err) else ""
    why = "no network: Hugging Face offline mode is on" if _offline() else "the hub could not be reached or the dataset was not found"
    return FlipcheckError(
        f"calibration source {source!r}: could not load the dataset ({why}; {type(err).__name__}: {msg}); "
        "pass a local .txt or .jsonl file or a folder of them as the calibration source "
        "(--calibration PATH, or calibration.source in a recipe)"
    )


PROMPTS = "prompts:"
PROMPTS_PER_TASK = 2000  # prompts read per task: far more text than calibration windows take


def prompts_source(tasks: list[str] | tuple[str, ...], include_path: str | os.PathLike | None = None) -> str:
    """The ``prompts:`` source naming the prompts of `tasks` (found also under `include_path`)."""
    if not tasks:
        raise FlipcheckError("a prompts: source needs at least one task")
    where = f":{Path(include_path).expanduser().resolve()}" if include_path else ""
    return f"{PROMPTS}{','.join(tasks)}{where}"


def _parse_prompts(source: str) -> tuple[list[str], str | None]:
    tasks, _, where = source[len(PROMPTS):].partition(":")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise FlipcheckError(f"calibration source {source!r}: expected prompts:TASK[,TASK...][:INCLUDE_PATH]")
    if where and not Path(where).expanduser().is_dir():
        raise FlipcheckError(f"calibration source {source!r}: {where!r} is not a folder of lm-eval task YAML files")
    return names, where or None


@functools.lru_cache(maxsize=4)
def _prompt_texts(source: str) -> tuple[str, ...]:
    """Every prompt (``doc_to_text``, never the target) of the tasks a ``prompts:`` source names."""
    from lm_eval.tasks import TaskManager, get_task_dict


    names, where = _parse_prompts(source)
    paths = [str(Path(where).expanduser().resolve())] if where else []
    local = TaskManager(include_path=[*paths, str(packaged_task_dir())], include_defaults=False)
    known = set(local.all_tasks) | set(local.all_groups) | set(local.all_tags)
    manager = local if all(n in known for n in names) else TaskManager(include_path=[*paths, str(packaged_task_dir())])
    try:
        tasks = get_task_dict(names, manager)
    except Exception as err:  # an unknown name, a dataset not cached offline: one line
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise FlipcheckError(f"calibration source {source!r}: could not load the tasks' documents ({msg})") from err
    texts: list[str] = []
    stack = list(tasks.values())
    while stack:
        task = stack.pop(0)
        if isinstance(task, dict):
            stack.extend(task.values())
            continue
        for doc in itertools.islice(task.eval_docs, PROMPTS_PER_TASK):
            text = task.doc_to_text(doc)
            if isinstance(text, str) and text.strip():
                texts.append(text)
    if not texts:
        raise FlipcheckError(f"calibration source {source!r}: the tasks have no text prompts")
    return tuple(texts)


def check_reachable(source: str) -> None:
    """Fail now, in one line, where :func:`read_texts` would fail on `source`, without reading its text.

    Named sources must be registered; local files and folders must exist and hold .txt/.jsonl text;
    ``hf:`` sources must parse, and with Hugging Face offline mode on, a hub dataset must resolve
    from the local cache (``datasets.load_dataset_builder``, which reads no rows). Online, the hub
    is not asked here: it is asked when the text is read.
    """
    if _named(source) is not None:
        return
    if source.startswith(PROMPTS):  # lm-eval reads local task data in a moment; the texts are kept for later
        _prompt_texts(source)
        return
    if source.startswith("hf:"):
        name, config, _ = parse_hf_source(source)
        if Path(name).expanduser().is_dir() or not _offline():
            return
        from datasets import load_dataset_builder

        try:
            load_dataset_builder(name, config)
        except Exception as err:  # datasets raises many types for "not cached"
            raise _unreachable(source, err) from err
        return
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        _folder_files(path, source)
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise FlipcheckError(f"calibration file {str(path)!r}: unsupported type {path.suffix!r}; allowed: .txt, .jsonl")
    else:
        raise _not_a_source(source)


def read_texts(source: str) -> list[str]:
    """The documents of a calibration source (see the module docstring for the forms)."""
    named = _named(source)
    if named is not None:
        return list(named())
    if source.startswith(PROMPTS):
        return list(_prompt_texts(source))
    if source.startswith("hf:"):
        return _hf_texts(source)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        docs: list[str] = []
        for f in _folder_files(path, source):
            docs.extend(_file_texts(f))
        return docs
    if path.is_file():
        return _file_texts(path)
    raise _not_a_source(source)


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
    """'hf:NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split, default 'train'); CONFIG may be empty."""
    parts = source[len("hf:") :].split(":", 2)  # a split's slice, train[:10], holds a colon of its own
    bad_split = len(parts) == 3 and (not parts[2] or ":" in re.sub(r"\[[^\]]*\]", "", parts[2]))
    if not parts[0] or bad_split or (len(parts) == 2 and not parts[1]):
        raise FlipcheckError(
            f"calibration source {source!r}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. {DEFAULT_SOURCE} "
            "or hf:allenai/c4:en:train[:1000]"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    return name, config, split


_ROW_SLICE = re.compile(r"^(?P<split>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d+)\]$")


def row_slice(split: str) -> tuple[str, int, int] | None:
    """'train[:1000]' -> ('train', 0, 1000); 'train[500:1500]' -> ('train', 500, 1500); else None."""
    m = _ROW_SLICE.match(split.replace(" ", ""))
    if m is None:
        return None
    start, stop = int(m["start"] or 0), int(m["stop"])
    if stop <= start:
        raise FlipcheckError(f"calibration split {split!r}: the slice selects no rows")
    return m["split"], start, stop


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_rows(name: str, config: str | None, split: str) -> tuple[list[str], list]:
    """(column names, "text" values) of a split; a row slice is streamed and only its rows read."""
    from datasets import load_dataset

    sliced = row_slice(split)
    if sliced is None:
        ds = load_dataset(name, config, split=split)
        return list(ds.column_names), (ds["text"] if "text" in ds.column_names else [])
    base, start, stop = sliced
    stream = load_dataset(name, config, split=base, streaming=True)
    rows = list(itertools.islice(iter(stream), start, stop))  # stops pulling rows (and files) at `stop`
    columns = list(rows[0]) if rows else ["text"]
    return columns, [r.get("text") for r in rows]


def _hf_texts(source: str) -> list[str]:
    name, config, split = parse_hf_source(source)
    try:
        columns, texts = _load_rows(name, config, split)
    except FlipcheckError:
        raise
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        raise _unreachable(source, err) from err
    if "text" not in columns:
        raise FlipcheckError(f"calibration source {source!r}: no 'text' column (columns: {', '.join(columns)})")
    return [t for t in texts if isinstance(t, str) and t.strip()]


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
