"""Packing scoring items into rows: a prefix tree of the inputs, its 4-D attention mask and positions.

A context and its continuations (each without its last token) are packed into ONE sequence: context
tokens are causal, each continuation sees the whole context and, causally, its own tokens, never
another continuation; position ids restart at ``len(context)`` for every continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flipcheck.errors import FlipcheckError

ROW_TOKENS = 1024  # packed rows grow to this many tokens (or one input's length) at most


@dataclass
class Row:
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
) -> list[Row]:
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
    rows: list[Row] = []
    row: Row | None = None
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
            row, shared = Row(tokens=[], positions=[], parents=[]), 0
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


def batch_bounds(lengths: Sequence[int], max_rows: int, forward_cost: int) -> list[tuple[int, int]]:
    """Split rows, in their order, into batches ``[(start, stop), ...]`` of at most `max_rows` rows.

    A batch is padded to its longest row, so it costs ``longest * rows`` tokens plus `forward_cost`
    tokens' worth of fixed cost per forward. Cutting every `max_rows` rows pads a short question to
    the length of the longest one beside it: on real MMLU (SmolLM2 tokens: median 81, longest 665),
    32 rows a batch ran 1.6-2.5x the tokens the questions hold. The cut points here minimise the
    total cost exactly (dynamic programming over contiguous groups, O(n * max_rows)); with rows
    sorted longest first a group's longest row is its first.
    """
    n = len(lengths)
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        longest, best[stop] = 0, -1
        for start in range(stop - 1, max(0, stop - max_rows) - 1, -1):  # the group rows[start:stop]
            longest = max(longest, lengths[start])
            cost = best[start] + longest * (stop - start) + forward_cost
            if best[stop] < 0 or cost < best[stop]:
                best[stop], cut[stop] = cost, start
    bounds: list[tuple[int, int]] = []
    stop = n
    while stop > 0:
        bounds.append((cut[stop], stop))
        stop = cut[stop]
    return bounds[::-1]


def attention_allow(row: Row, length: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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



def position_keys(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> list[int]:
    """One key per scored position of an item: a hash of the input prefix its prediction is made from.

    The prediction for ``cont[j]`` is read after the input ``(ctx + cont)[-(max_length + 1):][:-1]``
    up to and including its node; items with the same prefix there (the options of one question at
    their first token, options sharing leading tokens further on) predict from the same position.
    """
    path = (list(ctx) + list(cont))[-(max_length + 1) :][:-1]
    first = len(path) - len(cont) + 1
    h = hash(tuple(path[:first]))
    keys = [h]
    for t in path[first:]:
        h = hash((h, t))
        keys.append(h)
    return keys
