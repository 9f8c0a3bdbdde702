"""The transformers engine: a ``torch.nn.Module`` causal LM run in this process (the default)."""

from __future__ import annotations

from typing import Any

import torch

from flipcheck.evaluation.engines.base import EXACT, GENERATES, Engine, FloorPartner, cut_at_stop
from flipcheck.evaluation.engines.registry import register_engine
from flipcheck.evaluation.forward import ModelRunner


class TransformersEngine(Engine):
    """A transformers model in memory. Scoring goes through :class:`~flipcheck.evaluation.forward.ModelRunner`
    (packed prefix trees, the head applied only at scored positions); generation through HF ``generate``."""

    name = "transformers"
    rank = 0
    aliases = ("hf",)
    capabilities = frozenset({EXACT, GENERATES})

    @classmethod
    def identity_for(cls, source, dtype: torch.dtype) -> dict[str, Any]:
        import transformers

        ident: dict[str, Any] = {"name": cls.name, "version": transformers.__version__,
                                 "dtype": str(dtype).replace("torch.", "")}
        if getattr(source, "gguf", None):
            from flipcheck.evaluation.engines.llamacpp import gguf_file_type

            ident["dequantized_from"] = f"GGUF {gguf_file_type(source.gguf_path())}"
        return ident

    @classmethod
    def open(cls, source, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
             **options: Any) -> TransformersEngine:
        from flipcheck.models import load_model  # looked up at call time: tests count models.load_model

        model = load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(model, dequantized_from=getattr(source, "gguf", None))

    def floor_partners(self, source) -> list[FloorPartner]:
        """llama.cpp on a float32 GGUF written from these weights (kept in the cache)."""
        return [FloorPartner("llama.cpp", "engine-llama.cpp-F32", "llama.cpp engine (F32 GGUF)", write_f32=True)]

    def __init__(self, model: torch.nn.Module, *, dequantized_from: str | None = None) -> None:
        self.model = model.eval()
        self._runner = None
        self.dequantized_from = dequantized_from  # a GGUF file transformers dequantized to float on load

    @property
    def vocab(self) -> int:
        if self._runner is not None:
            return self._runner.vocab
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        out = getattr(head, "out_features", None)
        return int(out) if out else int(self.model.config.vocab_size)

    def runner(self):
        if self._runner is None:
            self._runner = ModelRunner(self.model)
        return self._runner

    def identity(self) -> dict[str, Any]:
        import transformers

        ident: dict[str, Any] = {"name": self.name, "version": transformers.__version__,
                                 "dtype": str(self._dtype()).replace("torch.", "")}
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl:
            ident["attention"] = str(impl)
        if self.dequantized_from:
            ident["dequantized_from"] = self.dequantized_from
        return ident

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        return dev if isinstance(dev, torch.device) else next(self.model.parameters()).device

    @torch.inference_mode()
    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.device]:
        logits = self.model(input_ids=ids.to(self.device())).logits[:, start:stop]
        return logits.reshape(-1, logits.shape[-1]), logits.device

    def generate(self, ctxs, max_new, stop_fn, eos_ids):
        """Greedy, one context at a time, as the other engines do (the evaluator's generative tasks go
        through :func:`flipcheck.evaluation.decoding.generate` instead: batched, with lm-eval's stops)."""
        out = []
        for ctx in ctxs:
            ids = torch.tensor([ctx])
            row = hf_generate(self.model, self.device(), ids, torch.ones_like(ids), max_new_tokens=max_new,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(cut_at_stop(row[0, len(ctx):].tolist(), stop_fn, eos_ids))
        return out


def hf_generate(model: torch.nn.Module, device, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """HF ``generate`` on a batch of left-padded contexts (``kwargs``: max_length, stopping criteria,
    pad id and the sampling settings), with the KV cache; the whole rows, contexts included."""
    with torch.inference_mode():
        return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **kwargs)


register_engine(TransformersEngine)
