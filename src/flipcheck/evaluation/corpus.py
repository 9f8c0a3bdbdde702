"""Distance on plain text: a parent and a child scored token by token over a corpus.

The corpus (an lm-eval perplexity task such as ``wikitext``, a local file, or ``hf:NAME``) is
joined into one token stream (documents separated by a blank line) and cut into consecutive,
non-overlapping windows of ``ctx`` tokens, as llama.cpp's ``llama-perplexity`` cuts its chunks: a
tokenizer that adds a BOS token has each window's first token replaced by BOS, and a remainder
shorter than ``ctx`` is left out (a corpus shorter than one window is one shorter window). Each
window is one forward pass; its first token is context only, and the positions it scores depend
on the convention:

- ``all`` (default): every later token of the window is predicted and scored (the first ones with
  little context);
- ``half`` (llama.cpp's): only tokens after the middle of the window, ``ctx/2 + 1 .. ctx - 1``, so
  every scored token has at least ``ctx / 2`` tokens of context (``ctx/2 - 1`` per window).

At every scored position, with P the parent's and C the child's next-token distribution:
KL(P||C) and KL(C||P) over the whole vocabulary, whether the two top-1 tokens agree, the change
of the probability of the actual next token (``dp = C(next) - P(next)``) and both models'
negative log-likelihoods (perplexity). The parent's side is computed once and cached (its exact
per-token values, plus the top-K log-probs and tail samples that the KL of a later child needs),
or the parent runs in lock-step with the child (``--kl exact``: both KLs exact).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck.compressors import calibration_data as cd
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines import as_engine
from flipcheck.evaluation.kl import (
    DEFAULT_TAIL_SAMPLES,
    TAIL_SEED,
    kl_exact_both,
    kl_reverse_topk_tail_tensors,
    kl_topk_tail_tensors,
    sample_tail,
)
from flipcheck.evaluation.kld_block import kl_by_parent_confidence, llama_block
from flipcheck.evaluation.tasks import task_manager
from flipcheck.models import adds_bos

log = logging.getLogger(__name__)

SCORING = ("all", "half")  # which positions of a window are scored (module docstring)
SEPARATOR = "\n\n"
CORPUS_VERSION = 3  # what a cached corpus entry holds; part of its key (2: one entry per chunk of windows; 3: p_top)
_LOGIT_BYTES = 1 << 29  # float32 logits of one forward batch: windows * ctx * vocab * 4 <= this

PARENT_FIELDS = ("nll", "argmax", "nonfinite", "window", "topk_logp", "topk_ids", "tail_logp", "tail_ids")
TOKEN_FIELDS = ("kl", "kl_rev", "agree", "dp", "nll_p", "nll_c", "window", "nonfinite_p", "nonfinite_c", "p_top")


@dataclass(frozen=True)
class Corpus:
    """A named text corpus: its documents and where they came from."""

    name: str
    source: str
    texts: tuple[str, ...]

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def check_scoring(scoring: str, ctx: int) -> None:
    if scoring not in SCORING:
        raise FlipcheckError(f"--scoring {scoring!r}: allowed are {', '.join(SCORING)}")
    if ctx < 4:
        raise FlipcheckError(f"--ctx {ctx}: a window needs at least 4 tokens")


def text_corpus(spec: str) -> Corpus:
    """``--text``: a .txt file (one stream), a .jsonl file of {"text": ...} rows, or hf:NAME[:CONFIG[:SPLIT]]
    (split ``test`` by default; the "text" column, rows joined by a blank line)."""
    if spec.startswith("hf:"):
        parts = spec[3:].split(":", 2)
        full = spec if len(parts) == 3 else spec + (":" if len(parts) == 1 else "") + ":test"
        try:
            texts = cd._hf_texts(full)
        except FlipcheckError as err:
            raise FlipcheckError(f"--text {spec!r}: {str(err).split(': ', 1)[-1]}") from err
        return Corpus(spec, spec, tuple(texts))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FlipcheckError(f"--text {spec!r}: no such file; pass a .txt or .jsonl file or hf:NAME[:CONFIG[:SPLIT]]")
    if path.suffix == ".jsonl":
        texts = cd._jsonl_texts(path)
    elif path.suffix in (".txt", ".md", ".raw", ""):
        texts = [path.read_text(encoding="utf-8")]
    else:
        raise FlipcheckError(f"--text {spec!r}: unsupported file type {path.suffix!r}; allowed: .txt, .jsonl, hf:NAME")
    if not any(t.strip() for t in texts):
        raise FlipcheckError(f"--text {spec!r}: the file holds no text")
    return Corpus(path.name, str(path.resolve()), tuple(texts))


def task_corpus(task: str, include_path, limit: int | float | None = None) -> Corpus:
    """The documents of an lm-eval perplexity task (``loglikelihood_rolling``, e.g. ``wikitext``): its
    evaluation split, each document as the task presents it (``doc_to_target``)."""
    from lm_eval.tasks import get_task_dict


    try:
        tasks = get_task_dict([task], task_manager(include_path, [task]))
    except Exception as err:  # datasets raises many types for "not reachable / not cached"
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise FlipcheckError(
            f"task {task!r}: could not load its documents ({msg}); offline, its dataset must be in the "
            "Hugging Face datasets cache, or pass the text with --text FILE"
        ) from err
    leaves = _leaf_tasks(tasks)
    if len(leaves) != 1:
        raise FlipcheckError(f"task {task!r}: a perplexity group of {len(leaves)} tasks; name one of its tasks")
    obj = leaves[0]
    docs = list(obj.eval_docs)
    texts = [obj.doc_to_target(d) for d in docs]
    return Corpus(task, f"lm-eval:{task}", tuple(str(t) for t in texts if str(t).strip()))


def _leaf_tasks(d: Any) -> list:
    out = []
    for v in (d.values() if isinstance(d, dict) else [d]):
        out.extend(_leaf_tasks(v) if isinstance(v, dict) else [v])
    return out


PIECE_CHARS = 1 << 18  # a document longer than this is tokenized in pieces of about this many characters
_SEAM_CHARS = 256  # context tokenized on each side of a seam; the tokens there must agree (checked)


def _encode_pieces(tokenizer, text: str, piece_chars: int = PIECE_CHARS) -> Iterator[list[int]]:
    """The token ids of `text` (no special tokens), in pieces, equal to tokenizing it whole.

    Each piece ``[a, b)`` of the text is tokenized with ``_SEAM_CHARS`` of text on each side and keeps
    the tokens that start inside it (character offsets of a fast tokenizer). At every seam the two
    tokenizations must agree: the next piece's first kept token starts where this one's last kept
    token ends; otherwise the seam moves and is checked again (a tokenizer without offsets, or a
    disagreement at every try, falls back to the whole text)."""
    n = len(text)
    if n <= piece_chars or not getattr(tokenizer, "is_fast", False):
        yield tokenizer(text, add_special_tokens=False)["input_ids"]
        return
    start, end_prev = 0, 0
    while start < n:
        stop = min(n, start + piece_chars)
        lo = max(0, start - _SEAM_CHARS)
        enc = tokenizer(text[lo : min(n, stop + _SEAM_CHARS)], add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        keep = [(t, lo + a, lo + b) for t, (a, b) in zip(ids, offs, strict=True) if start <= lo + a < stop]
        if keep and start > 0 and keep[0][1] != end_prev:
            raise FlipcheckError(f"corpus tokenization: pieces disagree at character {start}; report this text")
        if stop < n and keep and keep[-1][2] > stop:  # the last token crosses the seam: it ends this piece
            stop = keep[-1][2]
        yield [t for t, _, _ in keep]
        if keep:
            end_prev = keep[-1][2]
        start = max(stop, end_prev)


def _stream(tokenizer, corpus: Corpus) -> Iterator[list[int]]:
    """The corpus as one token stream, in pieces: documents tokenized one at a time, a blank line between."""
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    for i, text in enumerate(corpus.texts):
        if i:
            yield list(sep)
        yield from _encode_pieces(tokenizer, text)


def iter_windows(tokenizer, corpus: Corpus, ctx: int, limit: int | float | None = None) -> Iterator[np.ndarray]:
    """Consecutive windows of `ctx` token ids, produced as the corpus is tokenized (memory does not grow
    with the corpus). The first token of each window is replaced by BOS where the tokenizer adds one
    (see the module docstring). `limit`: at most that many windows (a count; a fraction if < 1 needs
    the whole count and is resolved by :func:`windows`)."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    buf: list[int] = []
    made = 0
    cap = int(limit) if limit is not None and limit >= 1 else None
    for piece in _stream(tokenizer, corpus):
        buf.extend(piece)
        while len(buf) >= ctx:
            w = np.asarray(buf[:ctx], dtype=np.int64)
            del buf[:ctx]
            if bos is not None:
                w[0] = bos
            yield w
            made += 1
            if cap is not None and made >= cap:
                return
    if made == 0:  # a corpus shorter than one window is one shorter window
        if len(buf) < 2:
            raise FlipcheckError(f"corpus {corpus.name!r} has fewer than 2 tokens")
        w = np.asarray(buf, dtype=np.int64)
        if bos is not None:
            w[0] = bos
        yield w


def windows(tokenizer, corpus: Corpus, ctx: int, limit: int | float | None = None) -> list[np.ndarray]:
    """Every window of the corpus as a list (see :func:`iter_windows`); `limit`: at most that many
    windows (a count, or a fraction if < 1)."""
    if limit is not None and limit < 1:
        out = list(iter_windows(tokenizer, corpus, ctx))
        return out[: max(1, int(math.ceil(limit * len(out))))]
    return list(iter_windows(tokenizer, corpus, ctx, limit))


def scored_range(length: int, scoring: str) -> tuple[int, int]:
    """[start, stop) of the logit positions scored in a window of `length` tokens (position i predicts
    token i + 1)."""
    if scoring == "half":
        return length // 2, length - 1
    return 0, length - 1


def _batches(wins: list[np.ndarray], vocab: int, batch_size: int):
    """Windows of equal length grouped into batches whose float32 logits stay under _LOGIT_BYTES."""
    order: dict[int, list[int]] = {}
    for i, w in enumerate(wins):
        order.setdefault(len(w), []).append(i)
    for length, idx in order.items():
        per = max(1, min(batch_size, _LOGIT_BYTES // max(1, length * vocab * 4)))
        for s in range(0, len(idx), per):
            part = idx[s : s + per]
            yield part, torch.from_numpy(np.stack([wins[i] for i in part]))


def _log_probs(engine, ids: torch.Tensor, scoring: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs (n, V) float32, next tokens (n,), non-finite mask (n,)) at the scored positions of a
    batch of equal-length windows, rows in window order, from any scoring engine."""
    s, e = scored_range(ids.shape[1], scoring)
    logits, dev = engine.window_log_probs(ids, s, e)
    targets = ids[:, s + 1 : e + 1].to(dev).reshape(-1)
    # non-finite as the question engine defines it (forward._side_arrays): a row whose largest logit is
    # NaN, +inf or -inf (a -inf entry alone, a masked token, is fine); one reduction, not a boolean
    # tensor the size of the logits (0.01 s against 0.30 s for 2,048 x 49,152)
    bad = ~torch.isfinite(logits.float().amax(-1))
    lp = torch.log_softmax(logits.float(), -1)
    return lp, targets, bad


def _n_scored(w: np.ndarray, scoring: str) -> int:
    s, e = scored_range(len(w), scoring)
    return e - s


@torch.inference_mode()
def score_parent(model, wins: list[np.ndarray], *, scoring: str, topk: int, tail: int = DEFAULT_TAIL_SAMPLES,
                 batch_size: int = 4, first_window: int = 0) -> dict[str, np.ndarray]:
    """The parent's side of every scored token: NLL, argmax, and its top-K log-probs plus `tail`
    tokens sampled outside them (what a later child's KL is estimated from). `model`: a torch model
    or any scoring engine. `first_window`: the corpus index of ``wins[0]`` (windows of a chunk); each
    window's tail is drawn from a generator seeded by its corpus index, so the samples do not depend
    on how the corpus is cut into chunks and batches."""
    engine = as_engine(model)
    vocab = engine.vocab
    k = min(topk, vocab)
    parts: dict[int, dict[str, np.ndarray]] = {}
    for idx, ids in _batches(wins, vocab, batch_size):
        lp, targets, bad = _log_probs(engine, ids, scoring)
        lp_safe = torch.where(bad[:, None], torch.zeros((), device=lp.device), lp)
        top_lp, top_ids = lp_safe.topk(k, -1)
        if tail and k < lp.shape[-1]:
            per = lp.shape[0] // len(idx)  # scored positions per window (the batch's windows have one length)
            gen = torch.Generator(device=lp.device)
            t_ids = torch.cat([
                sample_tail(lp_safe[j * per : (j + 1) * per], top_ids[j * per : (j + 1) * per], tail,
                            gen.manual_seed(TAIL_SEED + first_window + i))
                for j, i in enumerate(idx)
            ])
        else:
            t_ids = top_ids[:, :0]
        arr = {
            "nll": (-lp_safe.gather(-1, targets[:, None])[:, 0]).cpu().numpy(),
            "argmax": lp_safe.argmax(-1).to(torch.int32).cpu().numpy(),
            "nonfinite": bad.cpu().numpy(),
            "topk_logp": top_lp.cpu().numpy(), "topk_ids": top_ids.to(torch.int32).cpu().numpy(),
            "tail_logp": lp_safe.gather(-1, t_ids).cpu().numpy(), "tail_ids": t_ids.to(torch.int32).cpu().numpy(),
        }
        _split(arr, idx, [_n_scored(wins[i], scoring) for i in idx], parts, first_window)
    return _join(parts, len(wins))


def _split(arr: dict[str, np.ndarray], idx: list[int], counts: list[int], parts: dict, first_window: int = 0) -> None:
    off = 0
    for i, n in zip(idx, counts, strict=True):
        parts[i] = {k: v[off : off + n] for k, v in arr.items()}
        parts[i]["window"] = np.full(n, first_window + i, dtype=np.int32)
        off += n


def _join(parts: dict[int, dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    keys = parts[0].keys()
    return {k: np.ascontiguousarray(np.concatenate([parts[i][k] for i in range(n)])) for k in keys}


@torch.inference_mode()
def score_child(model, wins: list[np.ndarray], *, scoring: str, parent: dict[str, np.ndarray] | None = None,
                parent_model=None, batch_size: int = 4, first_window: int = 0) -> dict[str, np.ndarray]:
    """Per scored token of the child against the parent: KL both ways, top-1 agreement, dp and both NLLs.

    With `parent_model` (lock-step) both KLs are exact; with the cached `parent` side they are
    estimated from its top-K and tail samples (:func:`flipcheck.evaluation.kl.kl_topk_tail_tensors`
    and :func:`~flipcheck.evaluation.kl.kl_reverse_topk_tail_tensors`).
    """
    if (parent is None) == (parent_model is None):
        raise FlipcheckError("score_child needs exactly one of a cached parent side or a parent model")
    engine = as_engine(model)
    parent_engine = as_engine(parent_model) if parent_model is not None else None
    vocab = engine.vocab
    counts = [_n_scored(w, scoring) for w in wins]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parts: dict[int, dict[str, np.ndarray]] = {}
    for idx, ids in _batches(wins, vocab, batch_size):
        lq, targets, bad_c = _log_probs(engine, ids, scoring)
        dev = lq.device
        if parent_engine is not None:
            lp, _, bad_p = _log_probs(parent_engine, ids, scoring)
            lp = lp.to(dev)
            bad_p = bad_p.to(dev)
            nll_p = -lp.gather(-1, targets[:, None])[:, 0]
            arg_p = lp.argmax(-1)
            p_top = lp.amax(-1).exp()
            nll_c, arg_c = -lq.gather(-1, targets[:, None])[:, 0], lq.argmax(-1)
            kl, kl_rev = kl_exact_both(lp, lq)  # overwrites lp and lq
        else:
            sel = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in idx])

            def t(name, sel=sel, dev=dev):
                return torch.from_numpy(parent[name][sel]).to(dev)

            top_lp, top_ids, tail_lp, tail_ids = t("topk_logp"), t("topk_ids"), t("tail_logp"), t("tail_ids")
            kl = kl_topk_tail_tensors(top_lp, top_ids, tail_lp, tail_ids, lq)
            kl_rev = kl_reverse_topk_tail_tensors(top_lp, top_ids, tail_lp, tail_ids, lq)
            nll_p, arg_p, bad_p = t("nll"), t("argmax").long(), t("nonfinite")
            p_top = top_lp[:, 0].exp()  # topk is sorted: the parent's top-token probability
            nll_c, arg_c = -lq.gather(-1, targets[:, None])[:, 0], lq.argmax(-1)
        arr = {
            "kl": kl.float().cpu().numpy(), "kl_rev": kl_rev.float().cpu().numpy(),
            "agree": (arg_c == arg_p).cpu().numpy(),
            "dp": (torch.exp(-nll_c.double()) - torch.exp(-nll_p.double())).float().cpu().numpy(),
            "nll_p": nll_p.float().cpu().numpy(), "nll_c": nll_c.float().cpu().numpy(),
            "nonfinite_p": bad_p.cpu().numpy(), "nonfinite_c": bad_c.cpu().numpy(),
            "p_top": p_top.float().cpu().numpy(),
        }
        _split(arr, idx, [counts[i] for i in idx], parts, first_window)
    return _join(parts, len(wins))


# --------------------------------------------------------------------------- figures

KL_BINS = np.concatenate([[0.0], np.logspace(-6, 2, 33)])  # KL histogram edges (nats), log-spaced
DP_BINS = np.linspace(-1.0, 1.0, 41)


def _dist(x: np.ndarray, mean_ci: tuple[float, float] | None) -> dict[str, Any]:
    return {
        "mean": float(np.mean(x)), "ci": list(mean_ci) if mean_ci else None,
        "median": float(np.median(x)), "p90": float(np.quantile(x, 0.90)), "p99": float(np.quantile(x, 0.99)),
        "max": float(np.max(x)),
    }


def _cluster_ci(values: np.ndarray, window: np.ndarray, n_boot: int, seed: int) -> tuple[float, float] | None:
    """95 % interval of the token mean, resampling whole windows (tokens of a window are not independent)."""
    if len(values) == 0 or n_boot <= 0:
        return None
    _, inv = np.unique(window, return_inverse=True)
    sums = np.bincount(inv, weights=values.astype(np.float64))
    counts = np.bincount(inv).astype(np.float64)
    if len(sums) < 2:
        m = float(sums.sum() / counts.sum())
        return m, m
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def summarize(tokens: dict[str, np.ndarray], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The corpus figures of one child (README, "Distance on text"); positions where either model's
    logits hold NaN/inf are counted and left out of every figure."""
    bad_p, bad_c = tokens["nonfinite_p"].astype(bool), tokens["nonfinite_c"].astype(bool)
    ok = ~(bad_p | bad_c)
    n_windows = int(len(np.unique(tokens["window"])))
    out: dict[str, Any] = {
        "tokens": int(ok.sum()), "windows": n_windows,
        "nonfinite": {"parent": int(bad_p.sum()), "child": int(bad_c.sum())},
    }
    if not ok.any():
        return {**out, "kl": None, "kl_rev": None, "top1_agree": None, "dp_rms": None, "dp_p99": None,
                "ppl_parent": None, "ppl_child": None, "ln_ppl_ratio": None}
    w = tokens["window"][ok]
    kl, kl_rev = tokens["kl"][ok].astype(np.float64), tokens["kl_rev"][ok].astype(np.float64)
    agree = tokens["agree"][ok].astype(np.float64)
    dp = tokens["dp"][ok].astype(np.float64)
    nll_p, nll_c = tokens["nll_p"][ok].astype(np.float64), tokens["nll_c"][ok].astype(np.float64)
    ratio = nll_c - nll_p
    out.update({
        "kl": _dist(kl, _cluster_ci(kl, w, n_boot, seed)),
        "kl_rev": _dist(kl_rev, _cluster_ci(kl_rev, w, n_boot, seed + 1)),
        "top1_agree": {"mean": float(agree.mean()), "ci": _as_list(_cluster_ci(agree, w, n_boot, seed + 2))},
        "dp_rms": float(np.sqrt(np.mean(dp * dp))),
        "dp_p99": float(np.quantile(np.abs(dp), 0.99)),
        "dp_mean": float(dp.mean()),
        "ppl_parent": float(np.exp(nll_p.mean())),
        "ppl_child": float(np.exp(nll_c.mean())),
        "ln_ppl_ratio": {"mean": float(ratio.mean()), "ci": _as_list(_cluster_ci(ratio, w, n_boot, seed + 3))},
        "kl_hist": {"edges": KL_BINS.tolist(), "counts": np.histogram(np.clip(kl, 0, KL_BINS[-1]), KL_BINS)[0].tolist()},
        "dp_hist": {"edges": DP_BINS.tolist(), "counts": np.histogram(dp, DP_BINS)[0].tolist()},
        "llama_cpp": llama_block(kl, dp, agree, w, n_boot=n_boot, seed=seed + 4),
        "kl_by_p_top": kl_by_parent_confidence(kl, tokens["p_top"][ok]) if "p_top" in tokens else None,
    })
    return out


def _as_list(ci):
    return list(ci) if ci else None
