"""Answers of a model to the prompt set: chat template, greedy, multi-turn, cached on disk.

Each turn is answered with the conversation so far, the model's own earlier answers included
(MT-Bench's protocol). Answers are cached under ``CACHE/judge/answers/KEY.json`` keyed by the
model's fingerprint, its chat template, the prompt set's content and the generation settings,
and rewritten after every prompt, so the parent answers once for any number of children and an
interrupted run resumes at the next prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.files import cache_root, write_json_atomic
from flipcheck.judge.prompts import PromptSet
from flipcheck.models import load_tokenizer, resolve_device, resolve_dtype, resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How every model answers: greedy up to `max_new_tokens` per turn."""

    max_new_tokens: int = 256
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FlipcheckError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")


def answers_key(fingerprint: str, chat_template: str, prompts: PromptSet, gen: GenerationSettings, device: str,
                dtype: str) -> str:
    blob = json.dumps({
        "model": fingerprint, "chat_template": hashlib.sha256(chat_template.encode()).hexdigest(),
        "prompts": prompts.content_hash, "max_new_tokens": gen.max_new_tokens, "greedy": True,
        "device": device.split(":")[0], "dtype": dtype,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _chat_template(tokenizer: Any, spec: str) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    if not tpl:
        raise FlipcheckError(f"{spec}: its tokenizer has no chat template; judged answers need a chat (instruct) model")
    return str(tpl)


def _answers_file(ms: Any, tok: Any, prompts: PromptSet, gen: GenerationSettings,
                  cache_dir: str | Path | None) -> Path:
    template = _chat_template(tok, ms.spec)
    device = resolve_device(gen.device)
    dtype = str(resolve_dtype(gen.dtype, device))
    key = answers_key(ms.fingerprint, template, prompts, gen, device, dtype)
    return Path(cache_dir if cache_dir is not None else cache_root()) / "judge" / "answers" / f"{key}.json"


def _read_answers(path: Path, use_cache: bool, *, warn: bool = True) -> dict[str, list[str]]:
    if not (use_cache and path.is_file()):
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("answers") or {}
    except ValueError:
        if warn:
            log.warning("%s: unreadable cached answers; generating them again", path)
        return {}


def cached_answers(
    source: Any,
    prompts: PromptSet,
    gen: GenerationSettings,
    *,
    tokenizer: Any = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict[str, list[str]] | None:
    """The answers :func:`generate_answers` would return, when every one is cached; None otherwise.

    Loads the tokenizer (for its chat template, part of the key) but never the model.
    """
    if not use_cache:
        return None
    ms = resolve_source(source)
    tok = tokenizer if tokenizer is not None else load_tokenizer(ms, trust_remote_code=gen.trust_remote_code)
    done = _read_answers(_answers_file(ms, tok, prompts, gen, cache_dir), use_cache, warn=False)
    if any(p.id not in done for p in prompts.prompts):
        return None
    return {p.id: done[p.id] for p in prompts.prompts}


def generate_answers(
    source: Any,
    prompts: PromptSet,
    gen: GenerationSettings,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    before_work: Callable[[], None] | None = None,
) -> dict[str, list[str]]:
    """{prompt id: [answer per turn]} of the model at `source` (hub id, folder or ModelSource).

    `model` / `tokenizer`: an already loaded model (a recipe's in-memory child); loaded from
    `source` otherwise, and only when some answer is not cached. `before_work` is called once
    before the first answer that is not cached is generated (the judge's lazy preflight).
    """
    from flipcheck.models import (  # looked up at call time: tests count models.load_model
        load_model,
        load_tokenizer,
        resolve_source,
    )

    ms = resolve_source(source)
    tok = tokenizer if tokenizer is not None else load_tokenizer(ms, trust_remote_code=gen.trust_remote_code)
    path = _answers_file(ms, tok, prompts, gen, cache_dir)
    done = _read_answers(path, use_cache)
    todo = [p for p in prompts.prompts if p.id not in done]
    if todo:
        if before_work is not None:
            before_work()
        if model is None:
            model = load_model(ms, device=gen.device, dtype=gen.dtype, trust_remote_code=gen.trust_remote_code)
        meta = {"model": ms.ref, "fingerprint": ms.fingerprint, "prompts": prompts.source,
                "prompts_hash": prompts.content_hash, "settings": asdict(gen)}
        for i, p in enumerate(todo):
            done[p.id] = answer_conversation(model, tok, list(p.turns), gen.max_new_tokens)
            if use_cache:
                write_json_atomic(path, {**meta, "answers": done})
            log.info("%s: %d/%d prompts answered", ms.spec, len(prompts.prompts) - len(todo) + i + 1, len(prompts.prompts))
            if progress is not None:
                progress(len(prompts.prompts) - len(todo) + i + 1, len(prompts.prompts))
    return {p.id: done[p.id] for p in prompts.prompts}


@torch.no_grad()
def answer_conversation(model: torch.nn.Module, tokenizer: Any, turns: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to each user turn in order, each turn seeing the model's own earlier answers."""
    messages: list[dict[str, str]] = []
    answers: list[str] = []
    device = next(model.parameters()).device
    eos = _stop_ids(model, tokenizer)
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = enc["input_ids"].to(device)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, temperature=None, top_p=None, top_k=None,
        )
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        answers.append(text)
        messages.append({"role": "assistant", "content": text})
    return answers


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int] | None:
    ids: list[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, int) and x not in ids:
                ids.append(x)
    return ids or None
