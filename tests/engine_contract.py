"""The contract every registered scoring engine keeps, as plain checks that run wherever the engine does:
in the test process (transformers, llama.cpp, the fake engine of tests/fakes) and in vLLM's own venv
(``python tests/engine_contract.py vllm MODEL_FOLDER`` prints the failures as JSON; none is success).

The reference is the same weights run by transformers directly (float32, HF's forward and ``generate``),
not through flipcheck: an engine agrees with it, or says by its capabilities what it cannot give.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# Known capabilities (flipcheck.evaluation.engines.base): an engine names only these.
KNOWN = {"exact", "topk", "needs_targets", "generates", "remote"}
WINDOW, START, TOL = 16, 4, 1e-4


def reference(folder: str | Path):
    """(log-probs (2, WINDOW, V) of two fixed windows, greedy continuation of 6 tokens of a context,
    the windows, the context) from transformers run directly on `folder`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().out_features
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, WINDOW), generator=gen)
    ctx = ids[0, :8].tolist()
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        out = model.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    return logp, out[0, len(ctx):].tolist(), ids, ctx


def check(name: str, source_path: str | Path, folder: str | Path) -> list[str]:
    """The contract of engine `name` opened on `source_path` (a model of the weights in `folder`); returns
    what it breaks (an empty list: none)."""
    from flipcheck.evaluation.engines import engine_class, engine_names
    from flipcheck.models import resolve_source

    problems: list[str] = []
    cls = engine_class(name)
    source = resolve_source(str(source_path))
    caps = set(cls.capabilities)
    if not caps <= KNOWN:
        problems.append(f"unknown capabilities {sorted(caps - KNOWN)}")
    if ("exact" in caps) == ("topk" in caps):
        problems.append("an engine gives either the whole distribution (exact) or its top-K (topk)")
    before = cls.identity_for(source, torch.float32)
    engine = cls.open(source, device="cpu", dtype="float32")
    try:
        ident = engine.identity()
        for key in ("name", "version", "dtype"):
            if key not in ident or before.get(key) != ident.get(key):
                problems.append(f"identity {key}: {before.get(key)!r} before loading, {ident.get(key)!r} loaded")
        if ident.get("name") != cls.name:
            problems.append(f"identity names {ident.get('name')!r}, registered as {cls.name!r}")
        ref, greedy, ids, ctx = reference(folder)
        if engine.vocab != ref.shape[-1]:
            problems.append(f"vocab {engine.vocab}, the weights have {ref.shape[-1]}")
            return problems
        logits, _ = engine.window_log_probs(ids, START, WINDOW)
        got = torch.log_softmax(logits.float().cpu(), -1).reshape(2, WINDOW - START, -1)
        gap = float((got - ref[:, START:WINDOW]).abs().max())
        if not gap < TOL:
            problems.append(f"window log-probs differ from transformers' by {gap:.2e} (>= {TOL})")
        if "generates" in caps:
            (new,) = engine.generate([ctx], 6, lambda toks: False, set())
            if new != greedy:
                problems.append(f"greedy continuation {new}, transformers' {greedy}")
        names = set(engine_names())
        for partner in engine.floor_partners(source):  # another engine, or this one run another way
            if partner.engine not in names or (partner.engine == cls.name and not partner.options):
                problems.append(f"floor partner {partner.engine!r}: neither another registered engine nor "
                                "this one with other options")
    finally:
        engine.close()
    return problems


if __name__ == "__main__":  # vLLM runs in its own venv: the test runs this there
    print(json.dumps(check(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else sys.argv[2])))
