"""flipcheck's scoring LM: an lm-evaluation-harness ``LM`` that scores a child and its parent together.

lm-eval builds the requests from its own task configs; :class:`FlipLM` answers them and records, per
instance, what each model produced (:class:`Record`). Tokenization is lm-eval's own
(``TemplateLM._encode_pair``, the ``prefix_token_id`` for an empty context, HFLM's ``tok_encode``
and left truncation ``(ctx + cont)[-(max_length + 1):][:-1]``), so log-likelihoods agree with
lm-eval's HF backend and the chosen answers are the same.

How requests are scored (SPEC section 4):

- Requests are grouped by their context and each distinct context is run once for all its options.
  A context and its continuations (each without its last token) are packed into ONE sequence with a
  4-D attention mask: context tokens are causal, each continuation sees the whole context and,
  causally, its own tokens, never another continuation; position ids restart at ``len(context)``
  for every continuation. The first token of every option is predicted at the context's last
  position, so single-token options (MMLU letters) need the context alone. Rows are sorted by
  length and batched with right padding.
- For models whose logits are ``lm_head(decoder(x))`` (checked once per model by a probe), the head
  is applied only at the scored positions, so no ``batch x length x vocab`` tensor is built.
  log-softmax is float32 at those positions.
- Requests whose context plus continuation does not fit ``max_length`` are scored alone, left
  truncated exactly as HFLM does. Models whose attention cannot take a custom 4-D mask (flash
  attention, mixed sliding/full layers) are scored one sequence per request, as HFLM does.

The vocabulary-level distance (Dutta et al. 2024, "Accuracy is Not All You Need", arXiv 2407.09141;
llama.cpp ``--kl-divergence``) is measured at every scored continuation position:

    KL(P || C) = sum_v p_v (log p_v - log q_v)        (P = reference/parent, C = this model)

either exactly, with the reference run in lock-step on the same packed input (:func:`kl_exact`), or
from the reference's stored top-K log-probabilities (:func:`kl_from_topk`), a lower bound.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lm_eval.api.model import LM, TemplateLM
from tqdm.auto import tqdm

from flipcheck.errors import FlipcheckError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger(__name__)

InstanceKey = tuple[str, int, int]  # (instance.task_name, instance.doc_id, instance.idx)

KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_MAX_LENGTH = 2048  # HFLM's default when neither the config nor the tokenizer sets one
_CHUNK_ELEMENTS = 1 << 25  # logits computed per chunk of scored positions: positions * vocab <= this
ROW_TOKENS = 1024  # packed rows grow to this many tokens (or one input's length) at most
_PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that take a custom additive 4-D mask as is


# --------------------------------------------------------------------------------------------------
# Records


@dataclass(eq=False)
class Record:
    """What one model produced for one lm-eval ``Instance``.

    For ``loglikelihood`` and ``loglikelihood_rolling`` every array runs over the scored continuation
    positions (``n_tokens`` rows). For ``generate_until``, ``token_ids``/``topk_*`` run along this
    model's own greedy output (so the record can serve as a reference later), while ``kl`` and
    ``top1_agree`` run along the REFERENCE's output, teacher-forced through both models.
    """

    kind: str  # "loglikelihood" | "loglikelihood_rolling" | "generate_until"
    args_hash: str  # sha256 of repr(instance.args): detects stale reuse
    ll: float | None = None  # summed log-prob of the continuation
    is_greedy: bool | None = None  # every continuation token is this model's argmax
    n_tokens: int = 0  # scored positions
    text: str | None = None  # generate_until output, as lm-eval receives it
    topk_logp: np.ndarray | None = None  # (n_tokens, K) float32: this model's top-K log-probs per position
    topk_ids: np.ndarray | None = None  # (n_tokens, K) int32
    kl: np.ndarray | None = None  # (n,) float32: KL(reference || this model) per scored position
    top1_agree: np.ndarray | None = None  # (n,) bool: argmax reference == argmax this model
    token_ids: np.ndarray | None = None  # (n_tokens,) int32: the scored tokens (continuation / own output)


def instance_key(instance: Instance) -> InstanceKey:
    return (instance.task_name, instance.doc_id, instance.idx)


def args_hash(args: Any) -> str:
    """sha256 of ``repr(instance.args)``."""
    return hashlib.sha256(repr(args).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# KL divergence (pure functions)


def kl_exact(logp_ref_full: torch.Tensor, logp_child_full: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || C) over the last axis from full log-probability rows, in float32.

        KL(P || C) = sum_v p_v (log p_v - log q_v)

    Terms with p_v = 0 contribute 0; a token with p_v > 0 and q_v = 0 makes the KL infinite. Tiny
    negative values from float rounding are clamped to 0.
    """
    lp = logp_ref_full.float()
    lq = logp_child_full.float()
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    redo = torch.isnan(kl)  # 0 * -inf where p_v = 0: recompute those rows term by term
    if bool(redo.any()):
        pr, lpr, lqr = p[redo], lp[redo], lq[redo]
        kl[redo] = torch.where(
            pr > 0, pr * (lpr - lqr), torch.zeros((), dtype=lp.dtype, device=lp.device)
        ).sum(-1)
    return kl.clamp_min(0.0)


def _kl_topk(ref_lp: torch.Tensor, ref_ids: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Torch core of :func:`kl_from_topk`: float64 on the (n, K) parts, float32 out."""
    k = ref_lp.shape[-1]
    ids = ref_ids.long()
    lp = ref_lp.to(torch.float64)
    lq = logq.gather(-1, ids).to(torch.float64)
    p = lp.exp()
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    head = torch.where(p > 0, p * (lp - lq), zero).sum(-1)
    if k >= logq.shape[-1]:  # the head is the whole vocabulary: exact
        return head.clamp_min(0.0).float()
    # p_tail = 1 - sum_k p_k, from the stored log-probs without cancellation
    p_tail = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0.0)
    # q_tail: the child's mass outside the parent's top-K, summed directly (accurate when tiny)
    log_q_tail = logq.float().scatter(-1, ids, float("-inf")).logsumexp(-1).to(torch.float64)
    log_q_tail = log_q_tail.clamp_min(math.log(1e-300))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-300)) - log_q_tail), zero)
    return (head + tail).clamp_min(0.0).float()


def kl_from_topk(ref_topk_logp, ref_topk_ids, logp_child_full) -> np.ndarray:
    """KL(P || C) from the reference's top-K log-probs only (the cached-parent path).

        KL ~= sum_{k in topK(P)} p_k (log p_k - log q_k) + p_tail log(p_tail / q_tail)
        p_tail = 1 - sum_{k in topK(P)} p_k,   q_tail = 1 - sum_{k in topK(P)} q_k

    The tail outside the parent's top-K is treated as one bucket. By the log-sum inequality
    (sum_i a_i log(a_i / b_i) >= (sum a_i) log(sum a_i / sum b_i)) this is a LOWER bound of the
    exact KL; the gap is ``p_tail * KL(P_tail || C_tail)`` of the two tails renormalised, so it is
    small when the parent's top-K holds almost all its mass. With K = vocabulary size it is exact.
    ``q_tail`` is summed from the child's full distribution outside the top-K ids (no cancellation)
    and clamped away from 0.

    Args:
        ref_topk_logp: (n, K) reference log-probs of its top-K tokens.
        ref_topk_ids: (n, K) their token ids.
        logp_child_full: (n, V) the child's full log-probs at the same positions.

    Returns:
        (n,) float32 array.
    """
    ref_lp = torch.as_tensor(
        np.asarray(ref_topk_logp) if not torch.is_tensor(ref_topk_logp) else ref_topk_logp
    )
    ref_ids = torch.as_tensor(np.asarray(ref_topk_ids) if not torch.is_tensor(ref_topk_ids) else ref_topk_ids)
    logq = torch.as_tensor(
        np.asarray(logp_child_full) if not torch.is_tensor(logp_child_full) else logp_child_full
    )
    if (
        ref_lp.ndim != 2
        or ref_lp.shape != ref_ids.shape
        or logq.ndim != 2
        or logq.shape[0] != ref_lp.shape[0]
    ):
        raise FlipcheckError(
            f"kl_from_topk: expected (n, K), (n, K), (n, V); got {tuple(ref_lp.shape)}, "
            f"{tuple(ref_ids.shape)}, {tuple(logq.shape)}"
        )
    if ref_lp.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    ref_lp, ref_ids = ref_lp.to(logq.device), ref_ids.to(logq.device)
    return _kl_topk(ref_lp, ref_ids, logq).cpu().numpy().astype(np.float32)


def check_same_vocabulary(tokenizer_a, tokenizer_b) -> None:
    """Raise :class:`FlipcheckError` unless both tokenizers have the same token -> id map."""
    if tokenizer_a is tokenizer_b:
        return
    size_a, size_b = len(tokenizer_a), len(tokenizer_b)
    if size_a != size_b or tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise FlipcheckError(
            f"parent and child tokenizers differ (vocabulary sizes {size_b} and {size_a}, or the token->id "
            "maps differ): KL is meaningless across different vocabularies; compare models that share a tokenizer"
        )


# --------------------------------------------------------------------------------------------------
# Packing: rows of tokens forming a prefix tree of the requests' inputs


@dataclass
class _Row:
    """One sequence of a batch: the nodes of a prefix tree, parents before children.

    ``parents`` is None for a plain causal sequence (every node's parent is the previous one).
    """

    tokens: list[int]
    positions: list[int] | None = None  # depth of each node; None: 0..len-1
    parents: list[int] | None = None  # index of each node's parent, -1 for the root
    items: list[tuple[int, list[int]]] = field(default_factory=list)  # (item, node predicting each target)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_rows(
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    pack: bool,
    row_tokens: int = ROW_TOKENS,
) -> list[_Row]:
    """Lay scoring items ``(context_tokens, continuation_tokens)`` out as rows, longest first.

    Each item's model input is HFLM's ``(ctx + cont)[-(max_length + 1):][:-1]``; it reads the
    predictions at its last ``len(cont)`` nodes. With `pack`, inputs sorted by tokens are merged
    into a prefix tree: a shared prefix (the context of a question's options, a few-shot preamble)
    is stored, and run, once. An input joins the current row when it shares at least its whole
    context, or half of its input, with the previous one, and the row stays within
    ``max(len(input), min(max_length, row_tokens))`` nodes. Without `pack` only identical inputs
    share a row.
    """
    paths: list[tuple[int, ...]] = []
    for ctx, cont in items:
        if not len(cont):
            raise FlipcheckError("a request has an empty continuation: nothing to score")
        if len(cont) > max_length:
            raise FlipcheckError(
                f"a continuation of {len(cont)} tokens is longer than max_length={max_length}; raise max_length"
            )
        inp = (list(ctx) + list(cont))[-(max_length + 1) :][:-1]
        if not inp:
            raise FlipcheckError("a request has neither context nor a prefix token to condition on")
        paths.append(tuple(inp))
    rows: list[_Row] = []
    row: _Row | None = None
    prev: tuple[int, ...] = ()
    prev_nodes: list[int] = []
    for i in sorted(range(len(items)), key=paths.__getitem__):
        path, n_cont = paths[i], len(items[i][1])
        shared = _common_prefix(prev, path) if row is not None else 0
        ctx_len = min(len(items[i][0]), len(path))
        cap = max(len(path), min(max_length, row_tokens))
        joins = shared == len(path) or (
            pack
            and shared > 0
            and shared >= min(ctx_len, len(path) / 2)
            and len(row.tokens) + len(path) - shared <= cap
        )
        if not joins:
            row, shared = _Row(tokens=[], positions=[], parents=[]), 0
            rows.append(row)
        nodes = prev_nodes[:shared]
        for depth in range(shared, len(path)):
            row.parents.append(nodes[-1] if nodes else -1)
            row.tokens.append(path[depth])
            row.positions.append(depth)
            nodes.append(len(row.tokens) - 1)
        row.items.append((i, nodes[len(path) - n_cont :]))
        prev, prev_nodes = path, nodes
    for r in rows:
        if all(p == k - 1 for k, p in enumerate(r.parents)):  # a single chain: ordinary causal sequence
            r.positions = r.parents = None
    rows.sort(key=lambda r: -len(r.tokens))
    return rows


def attention_allow(row: _Row, length: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, length) bool mask (True = may attend) and position ids of a (padded) row.

    Node i sees node j iff j is i or one of its ancestors in the prefix tree (for a plain row: j <= i),
    and, for sliding-window models, ``pos_i - pos_j < window``. Padding attends to itself only.
    """
    n = len(row.tokens)
    pos = torch.zeros(length, dtype=torch.long)
    full = torch.eye(length, dtype=torch.bool)
    if row.parents is None:
        pos[:n] = torch.arange(n)
        allow = torch.ones(n, n, dtype=torch.bool).tril()
    else:
        pos[:n] = torch.tensor(row.positions)
        anc = np.zeros((n, n), dtype=bool)
        for k, parent in enumerate(row.parents):
            if parent >= 0:
                anc[k] = anc[parent]
            anc[k, k] = True
        allow = torch.from_numpy(anc)
    if window is not None:
        allow &= (pos[:n, None] - pos[None, :n]) < window
    full[:n, :n] = allow
    return full, pos


# --------------------------------------------------------------------------------------------------
# Per-model forward helpers


@dataclass
class _Side:
    """One model's view of one scoring item."""

    token_logp: np.ndarray  # (n,) float32 log-prob of each target token
    argmax: np.ndarray  # (n,) int64
    topk_logp: np.ndarray  # (n, K) float32
    topk_ids: np.ndarray  # (n, K) int32
    nonfinite: np.ndarray  # (n,) bool: NaN/inf in the logits at that position
    targets: np.ndarray  # (n,) int32

    @property
    def n(self) -> int:
        return len(self.targets)

    @property
    def ll(self) -> float:
        if self.nonfinite.any():
            return float("-inf")
        return float(np.sum(self.token_logp, dtype=np.float64))

    @property
    def is_greedy(self) -> bool:
        return bool(not self.nonfinite.any() and np.array_equal(self.argmax, self.targets))


@dataclass
class _Scored:
    own: _Side
    ref: _Side | None = None
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None


def _model_device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _sliding_window(config) -> tuple[int | None, bool]:
    """(window applied to every layer or None, whether one 4-D mask can describe all layers)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types:
        kinds = set(types)
        if kinds <= {"full_attention"}:
            return None, True
        if kinds == {"sliding_attention"} and window:
            return int(window), True
        return None, False
    if getattr(config, "use_sliding_window", True) is False or not window:
        return None, True
    return int(window), True


class _ModelRunner:
    """How to run one model: its device, dtype, whether the head can be applied at chosen positions
    and whether it honours a packed 4-D mask (both decided by probes on a tiny input)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = _model_device(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        self.dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head
        self.vocab = self._vocab_size()
        config = getattr(model, "config", None)
        self.window, mask_ok = _sliding_window(config)
        impl = getattr(config, "_attn_implementation", None)
        with torch.inference_mode():
            self.hidden_ok = self._probe_hidden()
            self.pack_ok = mask_ok and impl in _PACKABLE_ATTENTION and self._probe_pack()
        if not self.pack_ok:
            log.info(
                "%s: attention %r does not take a packed 4-D mask; scoring one sequence per request",
                type(model).__name__,
                impl,
            )
        if not self.hidden_ok:
            log.info("%s: logits are not lm_head(decoder(x)); computing full logits", type(model).__name__)

    def _vocab_size(self) -> int:
        w = getattr(self.head, "weight", None)
        if w is not None and w.ndim == 2 and getattr(self.head, "out_features", None):
            return int(self.head.out_features)
        return int(self.model.config.vocab_size)

    def _tol(self) -> float:
        return 1e-4 if self.dtype == torch.float32 else 2e-2

    def _probe_ids(self, n: int) -> list[int]:
        return [(7 * i + 3) % self.vocab for i in range(n)]

    def _probe_hidden(self) -> bool:
        if self.head is None or not hasattr(self.model, "get_decoder"):
            return False
        ids = torch.tensor([self._probe_ids(6)], device=self.device)
        try:
            ref = self.model(input_ids=ids).logits.float()
            got = self.head(self.model.get_decoder()(input_ids=ids).last_hidden_state).float()
        except Exception as err:  # noqa: BLE001 - any failure means: use full logits
            log.debug("hidden-state probe failed: %s", err)
            return False
        scale = max(1.0, float(ref.abs().max()))
        return got.shape == ref.shape and float((got - ref).abs().max()) <= self._tol() * scale

    def _probe_pack(self) -> bool:
        """Two continuations packed after one context give the logits of two separate sequences."""
        toks = self._probe_ids(9)
        ctx, branches = toks[:4], (toks[4:7], toks[7:9])
        items = [(ctx, b + [0]) for b in branches]
        rows = plan_rows(items, 64, pack=True)
        if len(rows) != 1 or rows[0].parents is None:
            return False
        try:
            packed = self.logits_rows(rows).float()[0]
            worst, scale = 0.0, 1.0
            for i, nodes in rows[0].items:
                alone = self.model(input_ids=torch.tensor([ctx + branches[i]], device=self.device)).logits
                alone = alone.float()[0, -len(nodes) :]
                worst = max(worst, float((packed[nodes] - alone).abs().max()))
                scale = max(scale, float(alone.abs().max()))
        except Exception as err:  # noqa: BLE001 - any failure means: do not pack
            log.debug("packing probe failed: %s", err)
            return False
        return worst <= self._tol() * scale

    def inputs(self, rows: list[_Row], pad_id: int, window: int | None) -> dict[str, torch.Tensor]:
        length = max(len(r.tokens) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.tokens)] = torch.tensor(r.tokens)
        out = {"input_ids": ids.to(self.device)}
        if any(r.parents is not None for r in rows):
            allows, positions = zip(*(attention_allow(r, length, window) for r in rows), strict=True)
            allow = torch.stack(allows)[:, None]
            mask = torch.zeros(allow.shape, dtype=self.dtype).masked_fill_(
                ~allow, torch.finfo(self.dtype).min
            )
            out["attention_mask"] = mask.to(self.device)
            out["position_ids"] = torch.stack(positions).to(self.device)
        return out

    def logits_rows(self, rows: list[_Row], pad_id: int = 0) -> torch.Tensor:
        """Full logits of a batch of rows (probe and fallback)."""
        return self.model(**self.inputs(rows, pad_id, self.window)).logits

    def selected(self, inputs: dict[str, torch.Tensor], rows_idx: torch.Tensor, pos_idx: torch.Tensor):
        """Hidden states (or logits, without the hidden route) at the chosen (row, position) pairs."""
        rows_idx, pos_idx = rows_idx.to(self.device), pos_idx.to(self.device)
        if self.hidden_ok:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            return hidden[rows_idx, pos_idx]
        return self.model(**inputs).logits[rows_idx, pos_idx]

    def logits_of(self, selected: torch.Tensor, s: int, e: int) -> torch.Tensor:
        part = selected[s:e]
        if self.hidden_ok:
            part = self.head(part)
        return part.float()


def _side_arrays(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """float32 log-softmax, argmax, top-K and the non-finite flag of a block of logit rows.

    A row is non-finite when its largest log-prob is not finite: NaN or +inf logits (``topk`` ranks
    NaN first), or all -inf. The argmax is the first top-K index unless the top two tie, where
    ``argmax`` (first index, as HFLM's greedy check) decides.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_v, top_i = torch.topk(logp, k, dim=-1)
    bad = ~torch.isfinite(top_v[:, 0])
    if k == 1:
        return logp, logp.argmax(-1), top_v, top_i, bad
    amax = top_i[:, 0].clone()
    tied = top_v[:, 0] == top_v[:, 1]
    if bool(tied.any()):
        amax[tied] = logp[tied].argmax(-1)
    return logp, amax, top_v, top_i, bad


# --------------------------------------------------------------------------------------------------
# The LM


class FlipLM(TemplateLM):
    """lm-eval ``LM`` scoring `model`, optionally against a reference (the parent).

    ``reference`` is None (score only; records carry top-K so they can be cached as a parent), a model
    (lock-step: both models run on the same packed input, exact KL over the whole vocabulary at each
    scored position; ``reference_records`` gets the reference's answers), or a dict of the parent's
    :class:`Record` (KL from its stored top-K, :func:`kl_from_topk`). lm-eval always receives THIS
    model's answers.
    """

    backend = "causal"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        reference: torch.nn.Module | dict[InstanceKey, Record] | None = None,
        topk: int = 64,
        max_gen_toks: int = 256,
        progress: bool = True,
        reference_tokenizer=None,
        add_bos_token: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FlipcheckError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise FlipcheckError(f"max_length={max_length!r}: must be None (the model's) or an integer >= 2")
        if not isinstance(topk, int) or topk < 1:
            raise FlipcheckError(
                f"topk={topk!r}: must be an integer >= 1 (64 keeps KL within ~1e-3 of exact)"
            )
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise FlipcheckError(f"max_gen_toks={max_gen_toks!r}: must be an integer >= 1")
        if reference is not None and not isinstance(reference, (torch.nn.Module, dict)):
            raise FlipcheckError(
                f"reference of type {type(reference).__name__}: allowed are None, a model (lock-step) "
                "or a dict of Records (cached parent)"
            )
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.batch_size = batch_size
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self.progress = progress
        self.add_bos_token = add_bos_token
        self.records: dict[InstanceKey, Record] = {}
        self.reference_records: dict[InstanceKey, Record] = {}
        self.nonfinite: dict[str, int] = {}
        self.reference_nonfinite: dict[str, int] = {}
        self._runner = _ModelRunner(self.model)
        self._device = self._runner.device
        self.topk = min(topk, self._runner.vocab)
        self._ref_runner: _ModelRunner | None = None
        self._ref_records: dict[InstanceKey, Record] | None = None
        if isinstance(reference, torch.nn.Module):
            if reference_tokenizer is not None:
                check_same_vocabulary(tokenizer, reference_tokenizer)
            self._ref_runner = _ModelRunner(reference.eval())
            if self._ref_runner.vocab != self._runner.vocab:
                raise FlipcheckError(
                    f"parent and child output {self._ref_runner.vocab} and {self._runner.vocab} logits: "
                    "KL is meaningless across different vocabularies"
                )
        elif isinstance(reference, dict):
            self._ref_records = reference
        runners = [self._runner] + ([self._ref_runner] if self._ref_runner else [])
        self._pack = all(r.pack_ok for r in runners)
        windows = {r.window for r in runners if r.window is not None}
        self._window = min(windows) if windows else None
        self._instances: list[Instance] | None = None

    # ---- lm-eval plumbing -------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(
            getattr(self.model, "config", None), self.tokenizer, default=DEFAULT_MAX_LENGTH
        )

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    @property
    def _pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs,
    ) -> list[int]:
        """HFLM's encoding: the tokenizer's default special tokens unless told (or `add_bos_token`), and
        none when the string already starts with the prefix token's text."""
        from lm_eval.models.utils import has_bos_prefix

        # lm-eval encodes each context once per option, and context+option again: memoise (bounded)
        memo = self.__dict__.setdefault("_encode_memo", {})
        key = (string, add_special_tokens, left_truncate_len)
        hit = memo.get(key)
        if hit is not None:
            return list(hit)
        if "_prefix_text" not in self.__dict__:
            self._prefix_text = None if self.prefix_token_id is None else self.tokenizer.decode(self.prefix_token_id)
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and self._prefix_text is not None and has_bos_prefix(string, self._prefix_text):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        if left_truncate_len:
            enc = enc[-left_truncate_len:]
        if len(memo) < 200_000:
            memo[key] = tuple(enc)
        return enc

    def _encode_context(self, string: str) -> list[int]:
        """HFLM's ``tok_batch_encode`` for one generation context (decided per string, not per batch)."""
        from lm_eval.models.utils import has_bos_prefix

        kw = {}
        if has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            kw["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        return self.tokenizer(string, **kw)["input_ids"]

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or not self.progress, leave=False)

    # ---- the scoring core -------------------------------------------------------------------------

    def _score(
        self,
        items: list[tuple[list[int], list[int]]],
        *,
        lockstep: bool = False,
        ref_topk: list[tuple[np.ndarray, np.ndarray]] | None = None,
        desc: str = "scoring",
        disable_tqdm: bool = False,
    ) -> list[_Scored]:
        """Score items ``(context_tokens, continuation_tokens)`` with this model, and with the
        reference when `lockstep` (exact KL) or against the given reference top-K rows (approximate KL).
        """
        results: list[_Scored | None] = [None] * len(items)
        if not items:
            return []
        rows = plan_rows(items, self.max_length, self._pack)
        ref = self._ref_runner if lockstep else None
        k = self.topk
        bar = self._bar(len(items), desc, disable_tqdm)
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                # distinct scored positions of the batch, and the (position, target) pairs of each item
                pos_index: dict[tuple[int, int], int] = {}
                pair_pos: list[int] = []
                pair_tok: list[int] = []
                spans: list[tuple[int, int, int, list[int]]] = []  # item, first pair, n, positions
                for b, row in enumerate(batch):
                    for item, idxs in row.items:
                        cont = items[item][1]
                        us = [pos_index.setdefault((b, t), len(pos_index)) for t in idxs]
                        spans.append((item, len(pair_pos), len(us), us))
                        pair_pos += us
                        pair_tok += cont
                n_pos = len(pos_index)
                rows_idx = torch.tensor([b for b, _ in pos_index])
                pos_idx = torch.tensor([t for _, t in pos_index])
                inputs = self._runner.inputs(batch, self._pad_id, self._window)
                sel = self._runner.selected(inputs, rows_idx, pos_idx)
                if ref is not None:
                    ref_inputs = ref.inputs(batch, self._pad_id, self._window)
                    ref_sel = ref.selected(ref_inputs, rows_idx, pos_idx)
                ref_rows = None
                if ref_topk is not None:  # one reference top-K row per distinct position
                    ref_rows = [None] * n_pos
                    for item, _, _, us in spans:
                        lp, ids = ref_topk[item]
                        for j, u in enumerate(us):
                            if ref_rows[u] is None:
                                ref_rows[u] = (lp[j], ids[j])
                    kk = min(len(r[0]) for r in ref_rows)
                    ref_lp_all = torch.tensor(np.stack([r[0][:kk] for r in ref_rows]), device=self._device)
                    ref_ids_all = torch.tensor(
                        np.stack([r[1][:kk] for r in ref_rows]).astype(np.int64), device=self._device
                    )

                dev = self._device
                p_pos = torch.tensor(pair_pos, device=dev)
                p_tok = torch.tensor(pair_tok, device=dev)
                own = self._empty_side(n_pos, len(pair_pos), k, dev)
                theirs = self._empty_side(n_pos, len(pair_pos), k, dev) if ref is not None else None
                kl = torch.full((n_pos,), float("nan"), device=dev) if (ref is not None or ref_rows) else None
                agree = torch.zeros(n_pos, dtype=torch.bool, device=dev) if kl is not None else None
                chunk = max(1, _CHUNK_ELEMENTS // max(1, self._runner.vocab))
                for s in range(0, n_pos, chunk):
                    e = min(n_pos, s + chunk)
                    in_chunk = (p_pos >= s) & (p_pos < e)
                    logq = self._fill_side(
                        own, self._runner.logits_of(sel, s, e), s, e, k, p_pos, p_tok, in_chunk
                    )
                    if ref is not None:
                        logp = self._fill_side(
                            theirs, ref.logits_of(ref_sel, s, e).to(dev), s, e, k, p_pos, p_tok, in_chunk
                        )
                        kl[s:e] = kl_exact(logp, logq)
                        agree[s:e] = theirs["argmax"][s:e] == own["argmax"][s:e]
                        bad = own["nonfinite"][s:e] | theirs["nonfinite"][s:e]
                    elif ref_rows is not None:
                        kl[s:e] = _kl_topk(ref_lp_all[s:e], ref_ids_all[s:e], logq)
                        agree[s:e] = ref_ids_all[s:e, 0] == own["argmax"][s:e]
                        bad = own["nonfinite"][s:e] | ~torch.isfinite(ref_lp_all[s:e, 0])
                    if kl is not None:
                        kl[s:e] = kl[s:e].masked_fill(bad, float("nan"))
                own_np = {name: t.cpu().numpy() for name, t in own.items()}
                ref_np = {name: t.cpu().numpy() for name, t in theirs.items()} if theirs is not None else None
                kl_np = kl.cpu().numpy() if kl is not None else None
                agree_np = agree.cpu().numpy() if agree is not None else None
                for item, p0, n, us in spans:
                    u = np.asarray(us, dtype=np.int64)
                    targets = np.asarray(items[item][1], dtype=np.int32)
                    res = _Scored(own=self._side_of(own_np, u, p0, n, targets))
                    if ref_np is not None:
                        res.ref = self._side_of(ref_np, u, p0, n, targets)
                    if kl_np is not None:
                        res.kl = kl_np[u].astype(np.float32)
                        res.agree = agree_np[u].astype(bool)
                    results[item] = res
                bar.update(len(spans))
        bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _empty_side(n_pos: int, n_pairs: int, k: int, dev: torch.device) -> dict[str, torch.Tensor]:
        return {
            "argmax": torch.zeros(n_pos, dtype=torch.long, device=dev),
            "topk_logp": torch.zeros(n_pos, k, dtype=torch.float32, device=dev),
            "topk_ids": torch.zeros(n_pos, k, dtype=torch.int32, device=dev),
            "nonfinite": torch.zeros(n_pos, dtype=torch.bool, device=dev),
            "token_logp": torch.zeros(n_pairs, dtype=torch.float32, device=dev),
        }

    @staticmethod
    def _fill_side(side, logits, s, e, k, p_pos, p_tok, in_chunk) -> torch.Tensor:
        logp, amax, top_v, top_i, bad = _side_arrays(logits.to(side["argmax"].device), k)
        side["argmax"][s:e] = amax
        side["topk_logp"][s:e] = top_v
        side["topk_ids"][s:e] = top_i.int()
        side["nonfinite"][s:e] = bad
        side["token_logp"][in_chunk] = logp[p_pos[in_chunk] - s, p_tok[in_chunk]]
        return logp

    @staticmethod
    def _side_of(arrs, u: np.ndarray, p0: int, n: int, targets: np.ndarray) -> _Side:
        return _Side(
            token_logp=arrs["token_logp"][p0 : p0 + n].astype(np.float32),
            argmax=arrs["argmax"][u],
            topk_logp=arrs["topk_logp"][u].astype(np.float32),
            topk_ids=arrs["topk_ids"][u].astype(np.int32),
            nonfinite=arrs["nonfinite"][u].astype(bool),
            targets=targets,
        )

    def _count_nonfinite(self, table: dict[str, int], task: str | None, side: _Side) -> None:
        bad = int(side.nonfinite.sum())
        if bad:
            key = str(task)
            if key not in table:
                log.warning("task %s: NaN/inf logits at scored positions; those answers score -inf", key)
            table[key] = table.get(key, 0) + bad

    def _cached(self, inst: Instance, kind: str) -> Record:
        assert self._ref_records is not None
        key = instance_key(inst)
        rec = self._ref_records.get(key)
        if rec is None:
            raise FlipcheckError(
                f"the cached parent results have no {kind} record for {key}: the cache does not match these "
                "tasks/limits; re-run the parent"
            )
        if rec.kind != kind or rec.args_hash != args_hash(inst.args):
            raise FlipcheckError(
                f"the cached parent record for {key} is stale (its request differs from this one): re-run the parent"
            )
        if rec.topk_logp is None or rec.topk_ids is None:
            raise FlipcheckError(
                f"the cached parent record for {key} has no top-K log-probs; re-run the parent"
            )
        if rec.topk_ids.size and int(rec.topk_ids.max()) >= self._runner.vocab:
            raise FlipcheckError(
                f"the cached parent record for {key} holds token ids beyond this model's {self._runner.vocab} "
                "logits: KL is meaningless across different vocabularies"
            )
        return rec

    @staticmethod
    def _make_record(kind: str, inst: Instance, side: _Side | None, **extra) -> Record:
        rec = Record(kind=kind, args_hash=args_hash(inst.args), **extra)
        if side is not None:
            rec.n_tokens = side.n
            rec.topk_logp, rec.topk_ids, rec.token_ids = side.topk_logp, side.topk_ids, side.targets
        return rec

    # ---- loglikelihood ----------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._instances = list(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)
        finally:
            self._instances = None

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        insts = (
            self._instances if self._instances is not None and len(self._instances) == len(requests) else None
        )
        items = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        ref_topk = None
        if self._ref_records is not None:
            if insts is None:
                raise FlipcheckError("scoring against cached parent records needs lm-eval Instances")
            ref_topk = []
            for inst, (_, cont) in zip(insts, items, strict=True):
                rec = self._cached(inst, "loglikelihood")
                if rec.n_tokens != len(cont):
                    raise FlipcheckError(
                        f"the cached parent record for {instance_key(inst)} scored {rec.n_tokens} tokens, this "
                        f"request has {len(cont)}: the tokenizer or max_length changed; re-run the parent"
                    )
                ref_topk.append((rec.topk_logp, rec.topk_ids))
        scored = self._score(
            items,
            lockstep=self._ref_runner is not None,
            ref_topk=ref_topk,
            desc="loglikelihood",
            disable_tqdm=disable_tqdm,
        )
        out = []
        for j, res in enumerate(scored):
            answer = (res.own.ll, res.own.is_greedy)
            out.append(answer)
            if insts is None:
                continue
            inst = insts[j]
            self.cache_hook.add_partial("loglikelihood", inst.args, answer)
            self._count_nonfinite(self.nonfinite, inst.task_name, res.own)
            self.records[instance_key(inst)] = self._make_record(
                "loglikelihood",
                inst,
                res.own,
                ll=answer[0],
                is_greedy=answer[1],
                kl=res.kl,
                top1_agree=res.agree,
            )
            if res.ref is not None:
                self._count_nonfinite(self.reference_nonfinite, inst.task_name, res.ref)
                self.reference_records[instance_key(inst)] = self._make_record(
                    "loglikelihood", inst, res.ref, ll=res.ref.ll, is_greedy=res.ref.is_greedy
                )
        return out

    # ---- loglikelihood_rolling --------------------------------------------------------------------

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: lm-eval's disjoint rolling windows of ``max_length``, summed (as HFLM)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        items: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for r, inst in enumerate(requests):
            (string,) = inst.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                items.append((list(ctx), list(cont)))
                owners.append(r)
        ref_topk = None
        if self._ref_records is not None:
            ref_topk = []
            offsets: dict[int, int] = {}
            for (_, cont), r in zip(items, owners, strict=True):
                rec = self._cached(requests[r], "loglikelihood_rolling")
                o = offsets.get(r, 0)
                if o + len(cont) > rec.n_tokens:
                    raise FlipcheckError(
                        f"the cached parent record for {instance_key(requests[r])} is stale; "
                        "re-run the parent"
                    )
                ref_topk.append((rec.topk_logp[o : o + len(cont)], rec.topk_ids[o : o + len(cont)]))
                offsets[r] = o + len(cont)
            for r, used in offsets.items():
                if used != self._ref_records[instance_key(requests[r])].n_tokens:
                    raise FlipcheckError(
                        f"the cached parent record for {instance_key(requests[r])} is stale; re-run the parent"
                    )
        scored = self._score(
            items,
            lockstep=self._ref_runner is not None,
            ref_topk=ref_topk,
            desc="loglikelihood_rolling",
            disable_tqdm=disable_tqdm,
        )
        per_req: dict[int, list[_Scored]] = {}
        for res, r in zip(scored, owners, strict=True):
            per_req.setdefault(r, []).append(res)
        out = []
        for r, inst in enumerate(requests):
            parts = per_req.get(r, [])
            own = _concat_sides([p.own for p in parts], self.topk)
            ll = own.ll if parts else 0.0
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", inst.args, ll)
            self._count_nonfinite(self.nonfinite, inst.task_name, own)
            kl = np.concatenate([p.kl for p in parts]) if parts and parts[0].kl is not None else None
            agree = np.concatenate([p.agree for p in parts]) if parts and parts[0].agree is not None else None
            self.records[instance_key(inst)] = self._make_record(
                "loglikelihood_rolling",
                inst,
                own,
                ll=ll,
                is_greedy=own.is_greedy if parts else True,
                kl=kl,
                top1_agree=agree,
            )
            if self._ref_runner is not None:
                ref = _concat_sides([p.ref for p in parts], self.topk)
                self._count_nonfinite(self.reference_nonfinite, inst.task_name, ref)
                self.reference_records[instance_key(inst)] = self._make_record(
                    "loglikelihood_rolling",
                    inst,
                    ref,
                    ll=ref.ll if parts else 0.0,
                    is_greedy=ref.is_greedy if parts else True,
                )
        return out

    # ---- generate_until ---------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation as HFLM does it (batched, left-padded, lm-eval's stop sequences and
        ``max_gen_toks``, contexts left-truncated to ``max_length - max_gen_toks``). Then the
        reference's output is teacher-forced through both models for per-token KL and top-1 agreement.
        """
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

        lockstep = self._ref_runner is not None
        texts: list[str | None] = [None] * len(requests)
        own_toks: list[list[int]] = [[] for _ in requests]
        ref_out: list[tuple[str, list[int]] | None] = [None] * len(requests)
        contexts: list[list[int]] = [[] for _ in requests]
        eos_str = (
            self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            if self.eot_token_id is not None
            else None
        )
        collator = Collator(
            [(i, inst.args) for i, inst in enumerate(requests)],
            sort_fn=lambda x: (-len(self.tok_encode(x[1][0])), x[1][0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1][1],
        )
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            idx = [c[0] for c in chunk]
            gen_kwargs = chunk[0][1][1]
            if not isinstance(gen_kwargs, dict):
                raise FlipcheckError(
                    f"generate_until: generation kwargs must be a dict, got {type(gen_kwargs).__name__}"
                )
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_str)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise FlipcheckError(
                    f"max_gen_toks={max_gen} leaves no room for the prompt within max_length={self.max_length}; "
                    "lower max_gen_toks or raise max_length"
                )
            ctxs = [self._encode_context(c[1][0])[-max_ctx:] for c in chunk]
            for i, ctx in zip(idx, ctxs, strict=True):
                contexts[i] = ctx
            outs = self._generate(self._runner, ctxs, until, max_gen, kwargs)
            for i, (text, toks) in zip(idx, outs, strict=True):
                texts[i], own_toks[i] = text, toks
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            if lockstep:
                for i, out in zip(
                    idx, self._generate(self._ref_runner, ctxs, until, max_gen, kwargs), strict=True
                ):
                    ref_out[i] = out
            bar.update(len(chunk))
        bar.close()

        # teacher forcing: this model along its own output (top-K for later use as a reference) and,
        # with a reference, both along the reference's output (KL, top-1 agreement)
        usable = [i for i in range(len(requests)) if contexts[i]]
        ref_items: list[int] = []
        ref_topk = None
        if lockstep:
            ref_items = [i for i in usable if ref_out[i][1]]
        elif self._ref_records is not None:
            ref_topk = []
            for i in usable:
                rec = self._cached(requests[i], "generate_until")
                if rec.token_ids is None:
                    raise FlipcheckError(
                        f"the cached parent record for {instance_key(requests[i])} has no "
                        "output tokens; re-run the parent"
                    )
                if len(rec.token_ids):
                    ref_items.append(i)
                    ref_topk.append((rec.topk_logp, rec.topk_ids))
        ref_tokens = {
            i: (
                ref_out[i][1]
                if lockstep
                else [int(t) for t in self._ref_records[instance_key(requests[i])].token_ids]
            )
            for i in ref_items
        }
        paired = self._score(
            [(contexts[i], ref_tokens[i]) for i in ref_items],
            lockstep=lockstep,
            ref_topk=ref_topk,
            desc="teacher forcing",
            disable_tqdm=disable_tqdm,
        )
        paired_of = dict(zip(ref_items, paired, strict=True))
        solo_items = [
            i for i in usable if own_toks[i] and not (i in paired_of and ref_tokens[i] == own_toks[i])
        ]
        solo = self._score(
            [(contexts[i], own_toks[i]) for i in solo_items],
            desc="teacher forcing",
            disable_tqdm=disable_tqdm,
        )
        own_of = dict(zip(solo_items, (s.own for s in solo), strict=True))
        for i in usable:
            if i not in own_of and i in paired_of and ref_tokens[i] == own_toks[i]:
                own_of[i] = paired_of[i].own

        for i, inst in enumerate(requests):
            key = instance_key(inst)
            own = own_of.get(i)
            if own is not None:
                self._count_nonfinite(self.nonfinite, inst.task_name, own)
            pair = paired_of.get(i)
            rec = self._make_record("generate_until", inst, own, text=texts[i])
            if own is None:
                rec.token_ids = np.asarray(own_toks[i], dtype=np.int32)
            if pair is not None:
                rec.kl, rec.top1_agree = pair.kl, pair.agree
            elif lockstep or self._ref_records is not None:
                rec.kl, rec.top1_agree = np.zeros(0, np.float32), np.zeros(0, bool)
            self.records[key] = rec
            if lockstep:
                ref_side = pair.ref if pair is not None else None
                ref_rec = self._make_record("generate_until", inst, ref_side, text=ref_out[i][0])
                if ref_side is None:
                    ref_rec.token_ids = np.asarray(ref_out[i][1], dtype=np.int32)
                    ref_rec.topk_logp = np.zeros((0, self.topk), np.float32)
                    ref_rec.topk_ids = np.zeros((0, self.topk), np.int32)
                self.reference_records[key] = ref_rec
        return texts  # type: ignore[return-value]

    def _generate(
        self, runner: _ModelRunner, ctxs: list[list[int]], until: list[str], max_gen: int, kwargs: dict
    ) -> list[tuple[str, list[int]]]:
        """HF ``generate`` on left-padded contexts with lm-eval's stop criteria; returns per request the
        post-processed text and the tokens up to and including where it stopped (eos or a stop string)."""
        from lm_eval.models.utils import postprocess_generated_text
        from lm_eval.models.utils_hf import stop_sequences_criteria

        width = max(len(c) for c in ctxs)
        if width == 0:
            raise FlipcheckError(
                "generate_until: an empty prompt encodes to no tokens; nothing to condition on"
            )
        ids = torch.full((len(ctxs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ctxs), width), dtype=torch.long)
        for b, c in enumerate(ctxs):
            if c:
                ids[b, width - len(c) :] = torch.tensor(c)
                mask[b, width - len(c) :] = 1
        gen = dict(kwargs)
        temperature = gen.setdefault("temperature", 0.0)
        if temperature == 0.0 and gen.get("do_sample") is None:
            gen["do_sample"] = False
        if gen.get("do_sample") is False and temperature == 0.0:
            gen.pop("temperature")
        criteria = stop_sequences_criteria(self.tokenizer, until, width, len(ctxs))
        with torch.inference_mode():
            out = runner.model.generate(
                input_ids=ids.to(runner.device),
                attention_mask=mask.to(runner.device),
                max_length=width + max_gen,
                stopping_criteria=criteria,
                pad_token_id=self._pad_id,
                use_cache=True,
                **gen,
            )
        eos_ids = _eos_ids(runner.model, self.tokenizer)
        results = []
        for row in out[:, width:].tolist():
            text = postprocess_generated_text(
                self.tokenizer.decode(row, skip_special_tokens=True), until, None
            )
            results.append((text, self._stopped_tokens(row, eos_ids, until)))
        return results

    def _stopped_tokens(self, row: list[int], eos_ids: set[int], until: list[str]) -> list[int]:
        """The generated tokens up to the first eos (kept) or the first token completing a stop string."""
        for j, t in enumerate(row):
            if t in eos_ids:
                row = row[: j + 1]
                break
        stops = [s for s in until if s]
        if stops and any(s in self.tokenizer.decode(row, skip_special_tokens=True) for s in stops):
            lo, hi = 1, len(row)  # smallest prefix whose text holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in self.tokenizer.decode(row[:mid], skip_special_tokens=True) for s in stops):
                    hi = mid
                else:
                    lo = mid + 1
            row = row[:lo]
        return row


def _eos_ids(model, tokenizer) -> set[int]:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _concat_sides(sides: Iterable[_Side], k: int) -> _Side:
    sides = list(sides)
    if not sides:
        return _Side(
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, k), np.float32),
            np.zeros((0, k), np.int32),
            np.zeros(0, bool),
            np.zeros(0, np.int32),
        )
    return _Side(
        *(
            np.concatenate([getattr(s, f) for s in sides])
            for f in ("token_logp", "argmax", "topk_logp", "topk_ids", "nonfinite", "targets")
        )
    )


# --------------------------------------------------------------------------------------------------
# Replay


class ReplayLM(LM):
    """Answers every request from recorded :class:`Record`s, so lm-eval computes a model's per-sample
    metrics (e.g. the parent's, from ``FlipLM.reference_records``) without running it again."""

    def __init__(self, records: dict[InstanceKey, Record]) -> None:
        super().__init__()
        self.records = records

    def _get(self, inst: Instance, kind: str) -> Record:
        key = instance_key(inst)
        rec = self.records.get(key)
        if rec is None:
            raise FlipcheckError(
                f"no recorded {kind} result for {key}: the records come from a run with other tasks or limits"
            )
        if rec.kind != kind:
            raise FlipcheckError(f"the record for {key} is a {rec.kind} result, the request asks for {kind}")
        if rec.args_hash != args_hash(inst.args):
            raise FlipcheckError(
                f"the record for {key} was made for a different request (stale): re-run the model"
            )
        return rec

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(float(r.ll), bool(r.is_greedy)) for r in (self._get(i, "loglikelihood") for i in requests)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return [float(self._get(i, "loglikelihood_rolling").ll) for i in requests]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [self._get(i, "generate_until").text for i in requests]
