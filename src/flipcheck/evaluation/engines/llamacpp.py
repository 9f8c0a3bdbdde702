"""The llama.cpp engine: a GGUF file scored by llama.cpp's own kernels (llama-cpp-python).

With ``logits_all`` llama.cpp returns the logits of every evaluated position over the whole
vocabulary, so KL against any other engine is exact. These are the numbers a user of llama.cpp,
Ollama or LM Studio gets: on Q4_0 and the K-quants llama.cpp multiplies with activations quantized
to 8 bits, which a transformers dequantization of the same file never does.

Sequences are evaluated one at a time, in one of two batch layouts (``layout``):

- ``prefix`` (the default): the KV cache keeps the longest prefix shared with the previous sequence,
  so the context of a question's options is run once per question (as the packed transformers path
  does, and as a llama.cpp server with prompt caching does) and each later option is evaluated as a
  continuation after it;
- ``whole``: every sequence evaluated from an empty cache, as ``llama-perplexity`` evaluates a window.

llama.cpp's quantized kernels round differently for different batch shapes (how many tokens one
``llama_decode`` holds), so on a K-quant or Q4_0 file the two layouts give option log-likelihoods that
differ by hundredths of a nat: the engine's own noise. ``--engine-floor`` on a GGUF parent scored by
llama.cpp shows it as a floor row (the same file in the other layout). flipcheck scores in ``prefix``:
a question's context runs once instead of once per option, and it is what a served llama.cpp with
prompt caching computes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.base import EXACT, GENERATES, ExternalRunner, FloorPartner, LoadedEngine
from flipcheck.evaluation.engines.registry import register_engine
from flipcheck.extras import LLAMACPP_HINT, llamacpp_available, require_llamacpp

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 2048  # tokens per sequence; the scores buffer is n_ctx x vocabulary float32
DEFAULT_N_BATCH = 512
KV_TYPE_F32 = 0  # GGML_TYPE_F32
LAYOUTS = ("prefix", "whole")  # a sequence after the previous one's shared prefix, or from an empty cache
INSTALL_HINT = LLAMACPP_HINT
available = llamacpp_available
require = require_llamacpp


def _field(reader, name: str):
    field = reader.get_field(name)
    return None if field is None else field.parts[field.data[0]][0]


def gguf_context_length(path: str | os.PathLike) -> int | None:
    """The training context length a GGUF declares (``ARCH.context_length``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    arch = reader.get_field("general.architecture")
    if arch is None:
        return None
    value = _field(reader, f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length")
    return None if value is None else int(value)


def gguf_file_type(path: str | os.PathLike) -> str:
    """The GGUF's file type as llama.cpp names it (F32, F16, Q8_0, Q4_K_M, ...), from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    value = _field(GGUFReader(str(path), "r"), "general.file_type")
    if value is None:
        return "unknown"
    value = int(value)
    try:
        return LlamaFileType(value).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        return f"type{value}"


def _eog_ids(llm, n_vocab: int) -> frozenset[int]:
    """The tokens llama.cpp ends a generation on (``llama_vocab_is_eog``: the file's EOS/EOT ids and the
    end-of-turn tokens it recognises, e.g. ``<|im_end|>``, ``<|eot_id|>``), as llama-server and llama-cli
    stop: a chat model's end-of-turn token is often not the tokenizer's EOS that flipcheck passes (SmolLM2:
    generation_config EOS ``<|im_end|>``, tokenizer EOS ``<|im_start|>``). Empty where the binding lacks the call."""
    import llama_cpp

    is_eog, vocab = getattr(llama_cpp, "llama_vocab_is_eog", None), getattr(getattr(llm, "_model", None), "vocab", None)
    if is_eog is None or vocab is None:
        return frozenset()
    return frozenset(t for t in range(n_vocab) if is_eog(vocab, t))


def llamacpp_identity(path: str | os.PathLike, n_ctx: int = DEFAULT_N_CTX, n_batch: int = DEFAULT_N_BATCH,
                      layout: str = "prefix") -> dict[str, Any]:
    """The identity of a GGUF on this engine, read from the file's metadata (nothing loaded): what the
    cache keys hold before the model is opened, and what the open engine reports."""
    import llama_cpp

    ident = {"name": LlamaCppEngine.name, "version": getattr(llama_cpp, "__version__", "?"),
             "dtype": gguf_file_type(path), "n_ctx": min(int(n_ctx), gguf_context_length(path) or int(n_ctx)),
             "n_batch": int(n_batch), "kv_cache": "f32", "stop": "eog"}  # generation ends on llama.cpp's EOG tokens
    if layout != "prefix":  # the default layout leaves the keys of earlier runs as they were
        ident["layout"] = layout
    return ident


class LlamaCppEngine(LoadedEngine):
    """A GGUF file loaded by llama.cpp (CPU here; ``n_gpu_layers`` offloads on a CUDA build)."""

    name = "llama.cpp"
    rank = 1
    aliases = ("llamacpp", "llama-cpp", "gguf")
    capabilities = frozenset({EXACT, GENERATES})

    @classmethod
    def default_for(cls, source) -> bool:
        """A GGUF file, where llama-cpp-python is installed (else transformers dequantizes it, and says so)."""
        if not getattr(source, "gguf", None):
            return False
        if not available():
            log.info("%s: llama-cpp-python is not installed; transformers dequantizes the GGUF (%s)",
                     source.spec, INSTALL_HINT)
            return False
        return True

    @classmethod
    def identity_for(cls, source, dtype: torch.dtype) -> dict[str, Any]:
        require()  # without llama-cpp-python: one line naming the pip command
        return llamacpp_identity(source.gguf_path())

    @classmethod
    def open(cls, source, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
             layout: str = "prefix", **options: Any) -> LlamaCppEngine:
        if not getattr(source, "gguf", None):
            raise FlipcheckError(
                f"{source.spec}: the llama.cpp engine scores GGUF files; make one with "
                "`flipcheck compress MODEL --method gguf --set type=F32` or pass a .gguf file"
            )
        n_gpu = -1 if device not in (None, "cpu") and torch.cuda.is_available() else 0
        return cls(source.gguf_path(), n_gpu_layers=n_gpu, layout=layout)

    def floor_partners(self, source) -> list[FloorPartner]:
        """The same file dequantized by transformers, and on llama.cpp with every sequence whole."""
        if source is None or not getattr(source, "gguf", None):
            return []
        return [FloorPartner("transformers", "engine-transformers", "transformers (dequantized GGUF)",
                             {"dtype": "float32"}),
                FloorPartner("llama.cpp", "engine-llama.cpp-whole", "llama.cpp, each sequence whole (same file)",
                             {"layout": "whole"})]

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = DEFAULT_N_CTX, n_batch: int = DEFAULT_N_BATCH,
                 n_threads: int | None = None, n_gpu_layers: int = 0, layout: str = "prefix") -> None:
        require()
        from llama_cpp import Llama

        if layout not in LAYOUTS:
            raise FlipcheckError(f"llama.cpp layout {layout!r}: allowed are {', '.join(LAYOUTS)}")
        self.layout = layout

        self.path = Path(path)
        if not self.path.is_file():
            raise FlipcheckError(f"GGUF file {str(self.path)!r} does not exist")
        self.n_batch = int(n_batch)
        threads = n_threads or max(1, torch.get_num_threads())
        n_ctx = min(int(n_ctx), gguf_context_length(self.path) or int(n_ctx))
        try:  # float32 KV cache: llama.cpp's default f16 cache rounds keys and values (~1e-4 on logits)
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                             logits_all=True, n_threads=threads, n_threads_batch=threads, type_k=KV_TYPE_F32,
                             type_v=KV_TYPE_F32, n_gpu_layers=int(n_gpu_layers), verbose=False, seed=0)
        except (ValueError, RuntimeError) as err:
            raise FlipcheckError(f"llama.cpp could not load {str(self.path)!r}: {str(err).splitlines()[0][:200]}") from err
        self.n_ctx = int(self.llm.n_ctx())
        self._max_length = self.n_ctx
        self._vocab = int(self.llm.n_vocab())
        self.eog = _eog_ids(self.llm, self._vocab)
        self._identity = llamacpp_identity(self.path, self.n_ctx, self.n_batch, layout)
        self._runner = ExternalRunner(self, self._logits_at)

    # -- evaluation --------------------------------------------------------------------------------
    def _eval(self, tokens: list[int]) -> None:
        """Evaluate `tokens`, keeping the KV cache of the prefix they share with what was evaluated last."""
        if len(tokens) > self.n_ctx:
            raise FlipcheckError(f"a sequence of {len(tokens)} tokens is longer than llama.cpp's n_ctx={self.n_ctx}")
        llm = self.llm
        done = llm.input_ids[: llm.n_tokens].tolist() if self.layout == "prefix" else []
        shared = 0
        for a, b in zip(done, tokens, strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)  # the last token's logits are always recomputed
        llm.n_tokens = shared
        llm.eval(tokens[shared:])

    def _logits_at(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        self._eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[positions], dtype=np.float32))

    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.device]:
        rows = [self._logits_at(w.tolist(), list(range(start, stop))) for w in ids]
        return torch.cat(rows) if rows else torch.zeros((0, self.vocab)), torch.device("cpu")

    def generate(self, ctxs: list[list[int]], max_new: int, stop_fn, eos_ids: set[int]) -> list[list[int]]:
        """Greedy continuations, each ending on a token of `eos_ids` or of llama.cpp's own end-of-generation
        set (kept), a completed stop sequence, or `max_new` tokens."""
        eos_ids = set(eos_ids) | self.eog
        out = []
        for ctx in ctxs:
            tokens = list(ctx)
            new: list[int] = []
            self._eval(tokens)
            while len(new) < max_new and len(tokens) < self.n_ctx:
                nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
                new.append(nxt)
                tokens.append(nxt)
                if nxt in eos_ids or stop_fn(new):
                    break
                self.llm.eval([nxt])
            out.append(new)
        return out

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


register_engine(LlamaCppEngine)
