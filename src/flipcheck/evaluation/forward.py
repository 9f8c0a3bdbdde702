"""Running one model (or a model and its reference in lock-step) over packed rows of scoring items.

- For models whose logits are ``lm_head(decoder(x))`` (checked once per model by a probe), the head
  is applied only at the scored positions, so no ``batch x length x vocab`` tensor is built.
  log-softmax is float32 at those positions.
- Models whose attention cannot take a custom 4-D mask (flash attention, mixed sliding/full layers)
  are scored one sequence per request, as HFLM does.
- :func:`score_items` returns per item this model's :class:`Side` and, with a reference (a model
  run in lock-step, or the reference's stored top-K rows), the KL and top-1 agreement per position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.kl import (
    TAIL_SEED,
    kl_bucket_bound,
    kl_exact_both,
    kl_reverse_topk_tail_tensors,
    kl_topk_tail_tensors,
    kl_topk_tensors,
    sample_tail,
)
from flipcheck.evaluation.packing import Row, attention_allow, batch_bounds, plan_rows

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 25  # logits computed per chunk of scored positions: positions * vocab <= this
FORWARD_COST_CPU = 64  # tokens: on a CPU a forward's fixed cost is small, so padding is what to avoid
FORWARD_COST_ACCELERATOR = 4096  # tokens: a GPU forward of a few thousand tokens costs about its launches
_PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that take a custom additive 4-D mask as is



@dataclass
class Side:
    """One model's view of one scoring item."""

    token_logp: np.ndarray  # (n,) float32 log-prob of each target token
    argmax: np.ndarray  # (n,) int64
    topk_logp: np.ndarray  # (n, K) float32
    topk_ids: np.ndarray  # (n, K) int32
    nonfinite: np.ndarray  # (n,) bool: NaN/inf in the logits at that position
    targets: np.ndarray  # (n,) int32
    tail_logp: np.ndarray | None = None  # (n, S) float32: log-probs of S tokens sampled outside the top-K
    tail_ids: np.ndarray | None = None  # (n, S) int32

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
class Scored:
    own: Side
    ref: Side | None = None
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None
    kl_rev: np.ndarray | None = None  # KL(this model || reference) at the same positions


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


class ModelRunner:
    """How to run one model: its device, dtype, whether the head can be applied at chosen positions
    and whether it honours a packed 4-D mask (both decided by probes on a tiny input)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = _model_device(model)
        # the fixed cost of one forward, in tokens' worth of work: batches are cut where padding would
        # cost more (packing.batch_bounds); a GPU forward's launch overhead weighs far more than a CPU's
        self.forward_cost = FORWARD_COST_CPU if self.device.type == "cpu" else FORWARD_COST_ACCELERATOR
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

    def inputs(self, rows: list[Row], pad_id: int, window: int | None) -> dict[str, torch.Tensor]:
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

    def logits_rows(self, rows: list[Row], pad_id: int = 0) -> torch.Tensor:
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



def concat_sides(sides: Iterable[Side], k: int) -> Side:
    """One :class:`Side` running over the positions of several, in order."""
    sides = list(sides)
    if not sides:
        return Side(
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, k), np.float32),
            np.zeros((0, k), np.int32),
            np.zeros(0, bool),
            np.zeros(0, np.int32),
        )
    fields = ["token_logp", "argmax", "topk_logp", "topk_ids", "nonfinite", "targets"]
    if all(s.tail_ids is not None for s in sides):
        fields += ["tail_logp", "tail_ids"]
    return Side(**{f: np.concatenate([getattr(s, f) for s in sides]) for f in fields})


# --------------------------------------------------------------------------------------------------
# Scoring items batch by batch


@dataclass
class ScoreSetup:
    """How items are laid out and run: shared by a model and its lock-step reference."""

    runner: ModelRunner
    max_length: int
    pack: bool
    window: int | None
    pad_id: int
    batch_size: int
    topk: int
    tail_samples: int = 0  # tokens sampled per position from outside the top-K (for use as a reference)
    ref_tail: bool = True  # use the cached reference's tail samples (False: the top-K + tail-bucket bound)


@dataclass
class _Layout:
    """The distinct scored positions of one batch and the (position, target) pairs of each item."""

    pos_index: dict[tuple[int, int], int]  # (row in batch, node) -> distinct position
    pair_pos: list[int]  # distinct position of each (item, target) pair
    pair_tok: list[int]  # target token of each pair
    spans: list[tuple[int, int, int, list[int]]]  # item, first pair, n pairs, distinct positions

    @classmethod
    def of(cls, batch: list[Row], items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> _Layout:
        layout = cls({}, [], [], [])
        for b, row in enumerate(batch):
            for item, nodes in row.items:
                us = [layout.pos_index.setdefault((b, t), len(layout.pos_index)) for t in nodes]
                layout.spans.append((item, len(layout.pair_pos), len(us), us))
                layout.pair_pos += us
                layout.pair_tok += list(items[item][1])
        return layout

    @property
    def n_pos(self) -> int:
        return len(self.pos_index)


def score_items(
    setup: ScoreSetup,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    reference: ModelRunner | None = None,
    ref_topk: Sequence[tuple] | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> list[Scored]:
    """Score items ``(context_tokens, continuation_tokens)`` with ``setup.runner``.

    With `reference` (a model run in lock-step on the same packed input) each result carries the
    reference's side and the exact KL; with `ref_topk` (one ``(topk_logp, topk_ids)`` pair of
    arrays per item, from the reference's records, optionally followed by its tail samples
    ``(tail_logp, tail_ids)``) the top-K + tail estimate of the KL (the bound without tail samples).
    With ``setup.tail_samples`` this model's sides carry that many tokens sampled outside its top-K.
    """
    if not items:
        return []
    results: list[Scored | None] = [None] * len(items)
    rows = plan_rows(items, setup.max_length, setup.pack)
    if getattr(setup.runner, "prefix_cache", False):  # an engine that keeps the KV cache of the last sequence:
        rows.sort(key=lambda r: r.tokens)  # neighbours share their longest prefixes (a question's options)
    gen = torch.Generator(device=setup.runner.device).manual_seed(TAIL_SEED) if setup.tail_samples else None
    forward_cost = getattr(setup.runner, "forward_cost", None)  # a runner that pads a batch to its longest row
    if forward_cost is None:
        bounds = [(s, min(s + setup.batch_size, len(rows))) for s in range(0, len(rows), setup.batch_size)]
    else:
        bounds = batch_bounds([len(r.tokens) for r in rows], setup.batch_size, forward_cost)
    with torch.inference_mode():
        for start, stop in bounds:
            batch = rows[start:stop]
            layout = _Layout.of(batch, items)
            for item, res in _score_batch(setup, batch, items, layout, reference, ref_topk, gen):
                results[item] = res
            if on_batch is not None:
                on_batch(len(layout.spans))
    return results  # type: ignore[return-value]


def _reference_rows(layout: _Layout, ref_topk, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """The reference's top-K rows (and tail samples, when every item has them) per distinct position of
    the batch, as (n_pos, K) (and (n_pos, S)) tensors."""
    rows: list[tuple[np.ndarray, ...] | None] = [None] * layout.n_pos
    for item, _, _, us in layout.spans:
        arrays = [a for a in ref_topk[item] if a is not None]
        for j, u in enumerate(us):
            if rows[u] is None:
                rows[u] = tuple(a[j] for a in arrays)
    # one parent entry has one K and one S; cutting a row would bias the tail estimate (its samples
    # were drawn outside the full top-K), so differing widths are an error, never trimmed
    if len({tuple(len(a) for a in r) for r in rows}) != 1:
        raise FlipcheckError("the cached parent's top-K / tail rows differ in width; clear the cache entry")
    out = [torch.tensor(np.stack([r[0] for r in rows]), device=dev),
           torch.tensor(np.stack([r[1] for r in rows]).astype(np.int64), device=dev)]
    if len(rows[0]) == 4:
        out.append(torch.tensor(np.stack([r[2] for r in rows]), device=dev))
        out.append(torch.tensor(np.stack([r[3] for r in rows]).astype(np.int64), device=dev))
    return tuple(out)


def _score_batch(setup, batch, items, layout: _Layout, ref, ref_topk, gen) -> list[tuple[int, Scored]]:
    runner, dev, k = setup.runner, setup.runner.device, setup.topk
    rows_idx = torch.tensor([b for b, _ in layout.pos_index])
    pos_idx = torch.tensor([t for _, t in layout.pos_index])
    inputs = runner.inputs(batch, setup.pad_id, setup.window)
    if getattr(runner, "needs_targets", False):  # a served model reads a target's log-prob only from a prompt that holds it
        inputs["targets"] = _targets_at(layout)
    sel = runner.selected(inputs, rows_idx, pos_idx)
    ref_sel = ref.selected(ref.inputs(batch, setup.pad_id, setup.window), rows_idx, pos_idx) if ref else None
    ref_rows = _reference_rows(layout, ref_topk, dev) if ref_topk is not None else None
    if ref_rows is not None and not setup.ref_tail:
        ref_rows = ref_rows[:2]
    topk_only = getattr(runner, "topk_only", None)  # a served model: its top-k only (0: no distribution)
    n_pos, n_pairs = layout.n_pos, len(layout.pair_pos)
    p_pos = torch.tensor(layout.pair_pos, device=dev)
    p_tok = torch.tensor(layout.pair_tok, device=dev)
    own = _empty_side(n_pos, n_pairs, k, dev, setup.tail_samples)
    theirs = _empty_side(n_pos, n_pairs, k, dev) if ref is not None else None
    with_kl = ref is not None or ref_rows is not None
    kl = torch.full((n_pos,), float("nan"), device=dev) if with_kl else None
    kl_rev = torch.full((n_pos,), float("nan"), device=dev) if with_kl else None
    agree = torch.zeros(n_pos, dtype=torch.bool, device=dev) if with_kl else None
    chunk = max(1, CHUNK_ELEMENTS // max(1, runner.vocab))
    for s in range(0, n_pos, chunk):
        e = min(n_pos, s + chunk)
        in_chunk = (p_pos >= s) & (p_pos < e)
        logq = _fill_side(own, runner.logits_of(sel, s, e), s, e, k, p_pos, p_tok, in_chunk, gen)
        if ref is not None:
            logp = _fill_side(theirs, ref.logits_of(ref_sel, s, e).to(dev), s, e, k, p_pos, p_tok, in_chunk)
            kl[s:e], kl_rev[s:e] = kl_exact_both(logp, logq)  # logp, logq are not used after this
            agree[s:e] = theirs["argmax"][s:e] == own["argmax"][s:e]
            bad = own["nonfinite"][s:e] | theirs["nonfinite"][s:e]
        elif ref_rows is not None:
            ref_lp, ref_ids = ref_rows[0][s:e], ref_rows[1][s:e]
            if topk_only is not None:
                if topk_only:
                    kl[s:e], kl_rev[s:e] = kl_bucket_bound(ref_lp, ref_ids, logq, topk_only)
            elif len(ref_rows) == 4:
                kl[s:e] = kl_topk_tail_tensors(ref_lp, ref_ids, ref_rows[2][s:e], ref_rows[3][s:e], logq)
                kl_rev[s:e] = kl_reverse_topk_tail_tensors(ref_lp, ref_ids, ref_rows[2][s:e], ref_rows[3][s:e], logq)
            else:
                kl[s:e] = kl_topk_tensors(ref_lp, ref_ids, logq)
                kl_rev[s:e] = kl_reverse_topk_tail_tensors(ref_lp, ref_ids, ref_lp[:, :0], ref_ids[:, :0], logq)
            agree[s:e] = ref_ids[:, 0] == own["argmax"][s:e]
            bad = own["nonfinite"][s:e] | ~torch.isfinite(ref_lp[:, 0])
            if topk_only == 0:  # echo + logprobs: the actual tokens' log-probs only, no distribution to compare
                bad = torch.ones_like(bad)
        if kl is not None:  # positions where either model is non-finite: no KL, no agreement
            kl[s:e] = kl[s:e].masked_fill(bad, float("nan"))
            kl_rev[s:e] = kl_rev[s:e].masked_fill(bad, float("nan"))
            agree[s:e] = agree[s:e] & ~bad
    return _collect(layout, items, own, theirs, kl, agree, kl_rev)


def _targets_at(layout: _Layout) -> dict[tuple[int, int], list[int]]:
    """(row, node) -> the distinct target tokens scored after that node."""
    nodes = list(layout.pos_index)  # distinct position u -> (row, node)
    out: dict[tuple[int, int], set[int]] = {}
    for u, tok in zip(layout.pair_pos, layout.pair_tok, strict=True):
        out.setdefault(nodes[u], set()).add(int(tok))
    return {k: sorted(v) for k, v in out.items()}


def _collect(layout: _Layout, items, own, theirs, kl, agree, kl_rev=None) -> list[tuple[int, Scored]]:
    own_np = {name: t.cpu().numpy() for name, t in own.items()}
    ref_np = {name: t.cpu().numpy() for name, t in theirs.items()} if theirs is not None else None
    kl_np = kl.cpu().numpy() if kl is not None else None
    agree_np = agree.cpu().numpy() if agree is not None else None
    rev_np = kl_rev.cpu().numpy() if kl_rev is not None else None
    out = []
    for item, p0, n, us in layout.spans:
        u = np.asarray(us, dtype=np.int64)
        targets = np.asarray(items[item][1], dtype=np.int32)
        res = Scored(own=_side_of(own_np, u, p0, n, targets))
        if ref_np is not None:
            res.ref = _side_of(ref_np, u, p0, n, targets)
        if kl_np is not None:
            res.kl = kl_np[u].astype(np.float32)
            res.agree = agree_np[u].astype(bool)
        if rev_np is not None:
            res.kl_rev = rev_np[u].astype(np.float32)
        out.append((item, res))
    return out


def _empty_side(n_pos: int, n_pairs: int, k: int, dev: torch.device, tail: int = 0) -> dict[str, torch.Tensor]:
    side = {
        "argmax": torch.zeros(n_pos, dtype=torch.long, device=dev),
        "topk_logp": torch.zeros(n_pos, k, dtype=torch.float32, device=dev),
        "topk_ids": torch.zeros(n_pos, k, dtype=torch.int32, device=dev),
        "nonfinite": torch.zeros(n_pos, dtype=torch.bool, device=dev),
        "token_logp": torch.zeros(n_pairs, dtype=torch.float32, device=dev),
    }
    if tail:
        side["tail_logp"] = torch.zeros(n_pos, tail, dtype=torch.float32, device=dev)
        side["tail_ids"] = torch.zeros(n_pos, tail, dtype=torch.int32, device=dev)
    return side


def _fill_side(side, logits, s, e, k, p_pos, p_tok, in_chunk, gen=None) -> torch.Tensor:
    logp, amax, top_v, top_i, bad = _side_arrays(logits.to(side["argmax"].device), k)
    side["argmax"][s:e] = amax
    side["topk_logp"][s:e] = top_v
    side["topk_ids"][s:e] = top_i.int()
    side["nonfinite"][s:e] = bad
    side["token_logp"][in_chunk] = logp[p_pos[in_chunk] - s, p_tok[in_chunk]]
    if "tail_ids" in side:
        ids = sample_tail(logp, top_i, side["tail_ids"].shape[1], gen)
        side["tail_ids"][s:e] = ids.int()
        side["tail_logp"][s:e] = logp.gather(-1, ids)
    return logp


def _side_of(arrs, u: np.ndarray, p0: int, n: int, targets: np.ndarray) -> Side:
    # the arrays already have their dtypes (float32, int32, bool: see _empty_side); fancy indexing copies
    tail = {"tail_logp": arrs["tail_logp"][u], "tail_ids": arrs["tail_ids"][u]} if "tail_ids" in arrs else {}
    return Side(
        token_logp=arrs["token_logp"][p0 : p0 + n].copy(),
        argmax=arrs["argmax"][u],
        topk_logp=arrs["topk_logp"][u],
        topk_ids=arrs["topk_ids"][u],
        nonfinite=arrs["nonfinite"][u],
        targets=targets,
        **tail,
    )
