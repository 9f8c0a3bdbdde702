"""The prompt set: conversations of one or more user turns, each with an optional category and reference.

Accepted, one JSON object per line:

- flipcheck's own shape: ``{"turns": ["first user turn", "follow-up"], "category": "writing",
  "reference": ["answer to turn 1", ...] | "answer", "id": "p1"}`` (only ``turns`` is required);
- MT-Bench's published ``question.jsonl``: ``{"question_id": 81, "category": "writing", "turns":
  [...], "reference": [...]}``, so ``--prompts path/to/mt_bench/question.jsonl`` works as is.

``hf:NAME[:CONFIG[:SPLIT]]`` (split default ``train``) reads a Hugging Face dataset with the same
columns: ``turns`` (or ``prompt`` / ``question`` / ``instruction``) a list of turns or one string,
``id`` / ``question_id`` / ``prompt_id``; ``hf:lighteval/mt-bench`` is MT-Bench's question.jsonl,
``hf:HuggingFaceH4/mt_bench_prompts`` the same questions with ``prompt`` for ``turns``. ``demo`` is
the small set shipped with flipcheck (data/judge_prompts.jsonl, the project's own text).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError


@dataclass(frozen=True)
class Prompt:
    """One conversation to answer: its user turns in order."""

    id: str
    turns: tuple[str, ...]
    category: str | None = None
    reference: tuple[str, ...] | None = None  # one per turn where given ("" where a turn has none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromptSet:
    source: str
    prompts: tuple[Prompt, ...]

    @property
    def content_hash(self) -> str:
        """sha256 of the prompts' content (ids, turns, categories, references), not of the file's bytes."""
        blob = json.dumps([p.to_dict() for p in self.prompts], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_prompts_path() -> Path:
    return Path(str(resources.files("flipcheck").joinpath("data/judge_prompts.jsonl")))


def load_prompts(spec: str, *, limit: int | None = None) -> PromptSet:
    """Read a prompt set from a JSONL file, ``hf:NAME[:CONFIG[:SPLIT]]`` or ``demo``."""
    if spec == "demo":
        records, origin = _read_jsonl(demo_prompts_path()), "demo"
    elif spec.startswith("hf:"):
        records, origin = _read_hf(spec), spec
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise FlipcheckError(f"--prompts {spec!r}: no such file; give a JSONL file, hf:NAME[:CONFIG[:SPLIT]] or 'demo'")
        records, origin = _read_jsonl(p), str(p)
    prompts = [_prompt(r, i, origin) for i, r in enumerate(records)]
    if not prompts:
        raise FlipcheckError(f"--prompts {spec!r}: no prompts in it")
    ids = [p.id for p in prompts]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise FlipcheckError(f"--prompts {spec!r}: prompt ids must be unique; repeated: {', '.join(dup[:5])}")
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet(origin, tuple(prompts))


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise FlipcheckError(f"{path}:{n}: not JSON ({err})") from err
        if not isinstance(obj, dict):
            raise FlipcheckError(f"{path}:{n}: each line must be a JSON object with \"turns\"")
        out.append(obj)
    return out


def _read_hf(spec: str) -> list[dict]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise FlipcheckError(f"--prompts {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, unknown dataset, no such split: one line
        raise FlipcheckError(f"--prompts {spec!r}: could not load the dataset ({str(err).splitlines()[0][:200]})") from err
    return [dict(r) for r in ds]


def _prompt(r: dict, index: int, origin: str) -> Prompt:
    where = f"{origin}: prompt {index + 1}"
    turns = next((r[k] for k in ("turns", "prompt", "question", "instruction") if r.get(k) is not None), None)
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise FlipcheckError(f"{where}: \"turns\" must be a non-empty list of user turns (strings)")
    pid = next((r[k] for k in ("id", "question_id", "prompt_id") if r.get(k) is not None), index + 1)
    ref = r.get("reference")
    if isinstance(ref, str):
        ref = [ref]
    if ref is not None and not (isinstance(ref, list) and all(isinstance(x, str) for x in ref)):
        raise FlipcheckError(f"{where}: \"reference\" must be a string or a list of strings (one per turn)")
    ref = tuple(ref) + ("",) * (len(turns) - len(ref)) if ref else None
    cat = r.get("category")
    return Prompt(id=str(pid), turns=tuple(turns), category=None if cat is None else str(cat), reference=ref)
