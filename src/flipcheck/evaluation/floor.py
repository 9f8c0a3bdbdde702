"""The noise floor: the parent against itself under changes that are not compression."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.extras import require_llamacpp
from flipcheck.files import cache_root
from flipcheck.models import resolve_source

if TYPE_CHECKING:
    from flipcheck.evaluation.evaluator_api import EvaluatorView as Evaluator

log = logging.getLogger(__name__)


def engine_floor(ev: Evaluator) -> list[dict]:
    """The parent against itself on another engine, the same weights: the rows the parent's engine
    names (:meth:`~flipcheck.evaluation.engines.base.Engine.floor_partners`): for a transformers
    parent, llama.cpp on a float32 GGUF written from it (kept in the cache, keyed by the parent's
    fingerprint); for a GGUF parent on llama.cpp, transformers' dequantization of the same file and
    the same file with every sequence evaluated whole instead of after the shared prefix (its kernels
    round differently for other batch shapes: llama.cpp's own floor); for a parent on vLLM,
    transformers on the same folder. What remains is the engines' numerics (kernels, reduction order,
    batch layout), the floor under any engine-vs-engine comparison."""
    from flipcheck.evaluation.engines import as_engine, open_engine

    ev.parent.ensure_loaded(ev.settings)
    parent_engine = as_engine(ev.parent.model)
    partners = parent_engine.floor_partners(ev.parent.resolved)
    if not partners:
        raise FlipcheckError(f"--engine-floor: a parent on {parent_engine.name} has no other engine to compare with; "
                             "run it on transformers, llama.cpp (a GGUF file) or vLLM")
    rows = []
    for p in partners:
        if p.write_f32:
            other = open_engine(_f32_gguf(ev), p.engine, device=ev.settings.device, **p.options)
        else:
            other = open_engine(ev.parent.resolved, p.engine, device=ev.settings.device, **p.options)
        rows.append(_floor_row(ev, other, p.key, p.label))
    return rows


def _f32_gguf(ev: Evaluator):
    """A float32 GGUF of the in-memory parent, written once into the cache (keyed by its fingerprint)."""
    from flipcheck.compressors.gguf_convert import write_gguf

    require_llamacpp("--engine-floor")
    path = Path(getattr(ev.cache, "root", None) or cache_root()) / "gguf" / f"{ev.parent.fingerprint}-F32.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_gguf(ev.parent.torch_model, ev.parent.tokenizer, tmp, dtype="F32")
        tmp.replace(path)
    return resolve_source(str(path))


def _floor_row(ev: Evaluator, engine, key: str, label: str) -> dict:
    """`engine` (the parent's weights) scored like a child against the parent's stored results, then closed."""
    from flipcheck.evaluation.model_ref import ModelRef

    ref = ModelRef(name=f"noise floor: {label}", source=None, model=engine, tokenizer=ev.parent.tokenizer,
                   fingerprint=f"{ev.parent.fingerprint}:{key}", info={"method": "noise_floor", "settings": {"engine": label}})
    try:
        entry, _ = ev.evaluate_child(ref, kl="topk")
    finally:
        engine.close()
    return entry


def noise_floor(ev: Evaluator) -> list[dict]:
    """The parent against itself under changes that are not compression, one entry per change:

    - another batch size (padding and packing change the kernels' reduction order);
    - its weights rounded to bfloat16 (float16 for a bfloat16 parent) and computed as before;
    - the other attention implementation (eager instead of sdpa, or sdpa instead of eager).

    Each is scored like a child against the parent's stored top-K and tail (``kl_method`` of
    the entries): lock-step would run both sides on the same batches and measure nothing.
    """
    from flipcheck.evaluation.model_ref import ModelRef

    ev.parent.ensure_loaded(ev.settings)
    bs = 1 if ev.settings.batch_size > 1 else 2
    entries = []
    for label, key, info, make, batch in _variants(ev.parent.torch_model or ev.parent.model, bs):
        model = make()
        if model is None:
            continue
        ref = ModelRef(
            name=f"noise floor: {label}", source=None, model=model, tokenizer=ev.parent.tokenizer,
            fingerprint=f"{ev.parent.fingerprint}:{key}", info={"method": "noise_floor", "settings": info},
        )
        entry, _ = ev.evaluate_child(ref, batch_size=batch, kl="topk")
        entries.append(entry)
        ref.model = None
        del model
    return entries


def _variants(parent, bs: int):
    """(label, cache-key suffix, settings, make the model (None: skip), batch size) per floor row."""
    yield f"batch size {bs}", f"batch{bs}", {"batch_size": bs}, lambda: parent, bs
    rounded = torch.float16 if _weights_dtype(parent) == torch.bfloat16 else torch.bfloat16
    name = str(rounded).replace("torch.", "")

    def rounded_copy():
        m = copy.deepcopy(parent)
        with torch.no_grad():
            for p in m.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(rounded).to(p.dtype))
        return m

    yield f"{name}-rounded weights", f"round-{name}", {"weights": name}, rounded_copy, None
    impl = getattr(parent.config, "_attn_implementation", None)
    other = {"sdpa": "eager", "eager": "sdpa"}.get(str(impl))

    def other_attention():
        if other is None:
            log.info("noise floor: attention %r has no eager/sdpa counterpart; row skipped", impl)
            return None
        m = copy.deepcopy(parent)
        m.set_attn_implementation(other)
        return m

    yield f"{other} attention", f"attn-{other}", {"attention": other, "instead_of": impl}, other_attention, None


def _weights_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
