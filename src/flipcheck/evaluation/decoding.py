"""lm-eval's ``generate_until`` on any engine: token ids in, text and the tokens up to the stop out.

A model in this process (the transformers engine) generates in batches through HF ``generate``
(:func:`flipcheck.evaluation.engines.transformers.hf_generate`), left-padded, with lm-eval's stop
criteria and, with ``--sample``, flipcheck's seed-synchronised sampling (:mod:`.sampling`); an engine
outside this process (llama.cpp, vLLM, a served model) generates greedily through its own
:meth:`~flipcheck.evaluation.engines.base.Engine.generate`. Either way the text is post-processed as
lm-eval does and the tokens are cut at the first eos (kept) or the first token completing a stop string.
"""

from __future__ import annotations

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.transformers import hf_generate
from flipcheck.evaluation.sampling import generate_kwargs


def generate(runner, tokenizer, pad_id: int, ctxs: list[list[int]], until: list[str], max_gen: int, kwargs: dict, *,
             sampling=None, keys: list[tuple] | None = None, sample: int = 0) -> list[tuple[str, list[int]]]:
    """Per context: the post-processed text and the generated tokens up to where it stopped."""
    from lm_eval.models.utils import postprocess_generated_text
    from lm_eval.models.utils_hf import stop_sequences_criteria

    width = max(len(c) for c in ctxs)
    if width == 0:
        raise FlipcheckError("generate_until: an empty prompt encodes to no tokens; nothing to condition on")
    engine = getattr(runner, "engine", None)
    if engine is not None:  # an engine outside this process (llama.cpp, vLLM): greedy, token by token
        return _external(engine, tokenizer, ctxs, until, max_gen)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for b, c in enumerate(ctxs):
        if c:
            ids[b, width - len(c):] = torch.tensor(c)
            mask[b, width - len(c):] = 1
    gen = dict(kwargs)
    temperature = gen.setdefault("temperature", 0.0)
    if temperature == 0.0 and gen.get("do_sample") is None:
        gen["do_sample"] = False
    if gen.get("do_sample") is False and temperature == 0.0:
        gen.pop("temperature")
    if sampling is not None:  # seed-synchronised sampling replaces the task's settings
        gen = generate_kwargs(sampling, keys, sample, width, gen)
    criteria = stop_sequences_criteria(tokenizer, until, width, len(ctxs))
    out = hf_generate(runner.model, runner.device, ids, mask, max_length=width + max_gen, stopping_criteria=criteria,
                      pad_token_id=pad_id, **gen)
    eos = eos_ids(runner.model, tokenizer)
    return [(postprocess_generated_text(tokenizer.decode(row, skip_special_tokens=True), until, None),
             stopped_tokens(tokenizer, row, eos, until)) for row in out[:, width:].tolist()]


def _external(engine, tokenizer, ctxs, until: list[str], max_gen: int) -> list[tuple[str, list[int]]]:
    from lm_eval.models.utils import postprocess_generated_text

    eos = eos_ids(None, tokenizer)
    stops = [s for s in until if s]

    def stop_fn(toks: list[int]) -> bool:
        return bool(stops) and any(s in tokenizer.decode(toks, skip_special_tokens=True) for s in stops)

    return [(postprocess_generated_text(tokenizer.decode(new, skip_special_tokens=True), until, None),
             stopped_tokens(tokenizer, list(new), eos, until))
            for new in engine.generate(ctxs, max_gen, stop_fn, eos)]


def stopped_tokens(tokenizer, row: list[int], eos: set[int], until: list[str]) -> list[int]:
    """The generated tokens up to the first eos (kept) or the first token completing a stop string."""
    for j, t in enumerate(row):
        if t in eos:
            row = row[: j + 1]
            break
    stops = [s for s in until if s]
    if stops and any(s in tokenizer.decode(row, skip_special_tokens=True) for s in stops):
        lo, hi = 1, len(row)  # smallest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tokenizer.decode(row[:mid], skip_special_tokens=True) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        row = row[:lo]
    return row


def eos_ids(model, tokenizer) -> set[int]:
    """The model's generation config eos ids, else the tokenizer's."""
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
