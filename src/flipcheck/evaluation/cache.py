"""Per-task results on disk: the parent's (so a sweep of K children costs K+1 passes) and each
finished child task (so an interrupted run resumes where it stopped).

An entry is a folder named by the hash of everything that changes the results: the model's
fingerprint (and the parent's, for a child), the task, few-shot, limit, seed, dtype, top-K, the
lm-eval and cache-format versions and the content of local task folders. It holds the lm-eval
per-sample dicts (``samples.json``), scalar fields of the per-request records (``records.json``)
and their arrays (``records.safetensors``: top-K log-probs, KL per token, one array per field
with each record's row span). No pickle anywhere.
Entries are written to a temporary folder and renamed into place, so a crash never leaves a
half-written entry that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ARRAY_FIELDS = ("topk_logp", "topk_ids", "kl", "top1_agree", "token_ids")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLIPCHECK_CACHE", Path.home() / ".cache" / "flipcheck"))


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return repr(obj)  # json has no inf/nan; lm-eval samples may carry -inf loglikelihoods
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _restore_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _restore_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_floats(v) for v in obj]
    if obj in ("-inf", "inf", "nan"):
        return float(obj)
    return obj


class ResultCache:
    """A folder of entries; ``get`` returns None on a miss, ``put`` is atomic."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self._mem: dict[str, tuple[dict, dict]] = {}  # with the disk cache off, entries live for the process

    def path(self, key: str) -> Path:
        return self.root / "results" / key[:2] / key

    def has(self, key: str) -> bool:
        return self.enabled and (self.path(key) / "done").is_file()

    def get(self, key: str, record_cls: type) -> tuple[dict, dict] | None:
        """(samples by task name, records by instance key) or None."""
        if not self.enabled:
            return self._mem.get(key)
        if not self.has(key):
            return None
        folder = self.path(key)
        try:
            samples = _restore_floats(json.loads((folder / "samples.json").read_text()))
            meta = json.loads((folder / "records.json").read_text())
            arrays = {}
            if (folder / "records.safetensors").exists():
                from safetensors.numpy import load_file

                arrays = load_file(str(folder / "records.safetensors"))
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable cache entry %s: %s", folder, err)
            return None
        records = {}
        for row in meta["records"]:
            key_t = (row.pop("_task"), int(row.pop("_doc")), int(row.pop("_idx")))
            spans = row.pop("_spans")
            row = _restore_floats(row)
            for name in ARRAY_FIELDS:
                span = spans.get(name)
                a = None if span is None else arrays[name][span[0] : span[1]]
                row[name] = a.astype(bool) if (a is not None and name == "top1_agree") else a
            records[key_t] = record_cls(**row)
        return samples, records

    def put(self, key: str, samples: dict[str, list[dict]], records: dict, info: dict | None = None) -> None:
        if not self.enabled:
            self._mem[key] = (samples, records)
            return
        from safetensors.numpy import save_file

        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.tmp-"))
        try:
            rows, chunks = [], {name: [] for name in ARRAY_FIELDS}
            offsets = dict.fromkeys(ARRAY_FIELDS, 0)
            for (task, doc, idx), rec in sorted(records.items()):
                row: dict[str, Any] = {"_task": task, "_doc": doc, "_idx": idx, "_spans": {}}
                for f in dataclasses.fields(rec):
                    v = getattr(rec, f.name)
                    if f.name not in ARRAY_FIELDS:
                        row[f.name] = _jsonable(v)
                    elif v is not None:
                        a = np.asarray(v)
                        chunks[f.name].append(a.astype(np.uint8) if a.dtype == bool else a)
                        row["_spans"][f.name] = [offsets[f.name], offsets[f.name] + len(a)]
                        offsets[f.name] += len(a)
                rows.append(row)
            arrays = {name: np.ascontiguousarray(np.concatenate(c)) for name, c in chunks.items() if c}
            (tmp / "samples.json").write_text(json.dumps(_jsonable(samples)))
            (tmp / "records.json").write_text(json.dumps({"records": rows}))
            if arrays:
                save_file(arrays, str(tmp / "records.safetensors"))
            (tmp / "info.json").write_text(json.dumps(_jsonable(info or {}), indent=2))
            (tmp / "done").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
