"""A fake engine: a transformers model run one whole sequence at a time through the external-engine
path (no packing, no prefix tree), as llama.cpp and vLLM are driven. One class, one registration."""

from __future__ import annotations

from typing import Any

import torch

from flipcheck.evaluation.engines import register_engine
from flipcheck.evaluation.engines.base import EXACT, GENERATES, ExternalRunner, LoadedEngine


class SequenceEngine(LoadedEngine):
    name = "one-sequence"
    capabilities = frozenset({EXACT, GENERATES})

    @classmethod
    def identity_for(cls, source, dtype: torch.dtype) -> dict[str, Any]:
        return {"name": cls.name, "version": "1", "dtype": "float32"}

    @classmethod
    def open(cls, source, *, device=None, dtype=None, trust_remote_code=False, **options) -> SequenceEngine:
        from flipcheck.models import load_model

        return cls(load_model(source, device="cpu", dtype="float32"))

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.calls = 0
        self._vocab = int(model.get_output_embeddings().out_features)
        self._identity = self.identity_for(None, torch.float32)
        self._runner = ExternalRunner(self, self._logits_at)

    @torch.inference_mode()
    def _logits_at(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        self.calls += 1
        return self.model(input_ids=torch.tensor([tokens])).logits[0, positions].float()

    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int):
        rows = [self._logits_at(w.tolist(), list(range(start, stop))) for w in ids]
        return torch.cat(rows), torch.device("cpu")

    def generate(self, ctxs, max_new, stop_fn, eos_ids):
        out = []
        for ctx in ctxs:
            tokens, new = list(ctx), []
            while len(new) < max_new:
                nxt = int(self._logits_at(tokens, [len(tokens) - 1])[0].argmax())
                new.append(nxt)
                tokens.append(nxt)
                if nxt in eos_ids or stop_fn(new):
                    break
            out.append(new)
        return out


register_engine(SequenceEngine)
