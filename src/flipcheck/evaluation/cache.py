"""Per-task results on disk: the parent's (so a sweep of K children costs K+1 passes) and each
finished child task (so an interrupted run resumes where it stopped).

An entry is a file named by the hash of everything that changes the results: the model's
fingerprint and identity (tokenizer, config; the parent's too, for a child), the task and its config,
few-shot, limit, seed, dtype, device kind, top-K, the lm-eval and cache-format versions and the
content of local task folders. It holds the lm-eval per-sample dicts, the scalar fields of the
per-request records and their arrays (top-K log-probs, KL per token, one array per field with each
record's row span), all in one safetensors file. No pickle anywhere.
Entries are written to a temporary file and moved into place atomically, so a crash or a concurrent
writer never leaves a half-written entry, and an entry of another format reads as a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flipcheck.files import cache_root, jsonable, restore_floats

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: non-finite floats marked as such; 2: one safetensors file per entry; 1: a folder
ARRAY_FIELDS = ("topk_logp", "topk_ids", "kl", "top1_agree", "token_ids", "tail_logp", "tail_ids", "kl_rev", "tf_miss",
                "samples_ids")
_BOOL_FIELDS = ("top1_agree", "tf_miss")


def folder_content_hash(paths: list[str] | tuple[str, ...]) -> str:
    """Hash of every task file (yaml, py, json, jsonl, txt) under the given folders."""
    h = hashlib.sha256()
    for root in sorted(paths):
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and p.suffix in (".yaml", ".yml", ".py", ".json", ".jsonl", ".txt", ".csv"):
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def entry_key(**fields: Any) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ResultCache:
    """A folder of entries; ``get`` returns None on a miss, ``put`` is atomic.

    An entry is one file, ``results/KEY[:2]/KEY.safetensors``: the record arrays, the per-sample and
    per-record JSON as uint8 arrays, and the format number in its metadata. It is written to a
    temporary file and moved into place with ``os.replace``, so concurrent writers of the same key
    never fail (the last complete file wins, and both hold the same results) and a reader opens
    either a whole old file or a whole new one. Anything unreadable or of another format is a miss.
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_root()
        self.enabled = enabled
        self._mem: dict[str, tuple[dict, dict]] = {}  # with the disk cache off, entries live for the process

    def path(self, key: str) -> Path:
        return self.root / "results" / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether an entry is there (without reading it)."""
        return self.path(key).is_file() if self.enabled else key in self._mem

    def get(self, key: str, record_cls: type) -> tuple[dict, dict] | None:
        """(samples by task name, records by instance key) or None."""
        if not self.enabled:
            return self._mem.get(key)
        return self._read(key, lambda arrays: (
            restore_floats(json.loads(arrays.pop(_SAMPLES).tobytes())),
            _records_from(json.loads(arrays.pop(_RECORDS).tobytes())["records"], arrays, record_cls),
        ))

    def _read(self, key: str, decode):
        """decode(arrays of the entry's file), or None on a miss: no file, another format, or a file that
        cannot be read or decoded (a damaged or foreign file is a miss, never an error)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}).get("format") != str(CACHE_FORMAT):
                    log.info("cache entry %s has another format; recomputing", path.name)
                    return None
                arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            return decode(arrays)
        except Exception as err:
            log.warning("ignoring unreadable cache entry %s: %s", path, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            return None

    def put(self, key: str, samples: dict[str, list[dict]], records: dict, info: dict | None = None) -> None:
        if not self.enabled:
            self._mem[key] = (samples, records)
            return
        rows, arrays = _records_to(records)
        arrays[_SAMPLES] = np.frombuffer(json.dumps(jsonable(samples, nonfinite="text")).encode(), dtype=np.uint8)
        arrays[_RECORDS] = np.frombuffer(json.dumps({"records": rows}).encode(), dtype=np.uint8)
        self._write(key, arrays, info)

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """A dict of plain arrays stored with :meth:`put_arrays` (corpus entries), or None."""
        if not self.enabled:
            return self._mem.get(key)  # type: ignore[return-value]
        return self._read(key, lambda arrays: arrays)

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray], info: dict | None = None) -> None:
        """Store plain arrays under `key`, atomically (bool arrays come back as bool)."""
        if not self.enabled:
            self._mem[key] = arrays  # type: ignore[assignment]
            return
        self._write(key, {k: np.ascontiguousarray(v) for k, v in arrays.items()}, info)

    def _write(self, key: str, arrays: dict[str, np.ndarray], info: dict | None) -> None:
        """One safetensors file written to a temporary name and moved into place (atomic)."""
        from safetensors.numpy import save_file

        meta = {"format": str(CACHE_FORMAT), "info": json.dumps(jsonable(info or {}, nonfinite="text"))}
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(arrays, tmp, metadata=meta)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_SAMPLES, _RECORDS = "__samples_json__", "__records_json__"


def _records_to(records: dict) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Scalar fields of each record as JSON rows; array fields concatenated, with each row's span."""
    rows, chunks = [], {name: [] for name in ARRAY_FIELDS}
    offsets = dict.fromkeys(ARRAY_FIELDS, 0)
    for (task, doc, idx), rec in sorted(records.items()):
        row: dict[str, Any] = {"_task": task, "_doc": doc, "_idx": idx, "_spans": {}}
        for f in dataclasses.fields(rec):
            v = getattr(rec, f.name)
            if f.name not in ARRAY_FIELDS:
                row[f.name] = jsonable(v, nonfinite="text")
            elif v is not None:
                a = np.asarray(v)
                chunks[f.name].append(a.astype(np.uint8) if a.dtype == bool else a)
                row["_spans"][f.name] = [offsets[f.name], offsets[f.name] + len(a)]
                offsets[f.name] += len(a)
        rows.append(row)
    return rows, {name: np.ascontiguousarray(np.concatenate(c)) for name, c in chunks.items() if c}


def _records_from(rows: list[dict], arrays: dict[str, np.ndarray], record_cls: type) -> dict:
    records = {}
    declared = {f.name for f in dataclasses.fields(record_cls)}
    for row in rows:
        key_t = (row.pop("_task"), int(row.pop("_doc")), int(row.pop("_idx")))
        spans = row.pop("_spans")
        row = restore_floats(row)
        for name in (n for n in ARRAY_FIELDS if n in declared):
            span = spans.get(name)
            a = None if span is None else arrays[name][span[0] : span[1]]
            row[name] = a.astype(bool) if (a is not None and name in _BOOL_FIELDS) else a
        records[key_t] = record_cls(**row)
    return records
