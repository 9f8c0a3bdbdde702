"""The transformers engine: a ``torch.nn.Module`` causal LM run in this process (the default)."""

from __future__ import annotations

from typing import Any

import torch

from flipcheck.evaluation.engines.base import Engine


class TransformersEngine(Engine):
    """A transformers model in memory. Scoring goes through :class:`~flipcheck.evaluation.forward.ModelRunner`
    (packed prefix trees, the head applied only at scored positions); generation through HF ``generate``."""

    name = "transformers"

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
            from flipcheck.evaluation.forward import ModelRunner

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

    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.device]:
        logits = self.model(input_ids=ids.to(self.device())).logits[:, start:stop]
        return logits.reshape(-1, logits.shape[-1]), logits.device

    def generate(self, ctxs, max_new, stop_fn, eos_ids):  # pragma: no cover - FlipLM drives HF generate itself
        raise NotImplementedError("the transformers engine generates through FlipLM's batched HF generate")
