"""Seed-synchronised sampling: parent and child draw with the same noise, so only their distributions differ.

    flipcheck eval PARENT CHILD --tasks gsm8k --sample temperature=0.7,top_p=0.95 --samples 4

Sampling is done by the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014, "A* Sampling"): with
g_v ~ Gumbel(0, 1) independent, argmax_v (z_v / T + g_v) over the tokens v kept by top-k / top-p is a
draw from softmax(z / T) restricted (and renormalised) to those tokens. The noise vector g is a
function of (seed, question, sample index, position) only: generated from a counter-based seed
sha256(seed | task | doc_id | request | sample | t), never from a shared random stream. So the parent
and a child given the same prompt draw with the same g at every position: identical distributions
give identical texts, a child whose distribution moved a little keeps the parent's text until the
moved mass changes an argmax, and the first divergent token and the share of matched tokens measure
that. It does not depend on batch composition or padding (t counts generated tokens).

Sampling overrides the task's own generation settings (lm-eval's ``do_sample``/``temperature``);
sample 0 is the answer lm-eval scores (flips, exact match), samples 1.. feed the divergence figures.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from flipcheck.errors import FlipcheckError

_KEYS = {"temperature": float, "top_p": float, "top_k": int}
_ITEM = re.compile(r"^\s*([a-z_]+)\s*=\s*([^,=\s]+)\s*$")


@dataclass(frozen=True)
class SampleSpec:
    """How generations are drawn: temperature T > 0, nucleus top_p in (0, 1], top_k (0: off), samples per question."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    samples: int = 1
    seed: int = 0


def _bad(text: str, why: str) -> FlipcheckError:
    return FlipcheckError(
        f"--sample {text!r}: {why}; expected comma-separated key=value with keys temperature (> 0), top_p (0 < p <= 1) "
        "and top_k (>= 0), e.g. temperature=0.7,top_p=0.95"
    )


def parse_sample(text: str | None, samples: int = 1, seed: int = 0) -> SampleSpec | None:
    """``--sample temperature=0.7,top_p=0.95`` and ``--samples N`` -> a :class:`SampleSpec` (None: greedy)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise FlipcheckError(f"--samples {samples!r}: a number of samples per question >= 1")
    if text is None:
        if samples != 1:
            raise FlipcheckError(f"--samples {samples}: sampling needs --sample, e.g. --sample temperature=0.7,top_p=0.95")
        return None
    values: dict[str, float | int] = {}
    for item in str(text).split(","):
        m = _ITEM.match(item)
        if not m or m.group(1) not in _KEYS:
            raise _bad(text, f"cannot read {item.strip()!r}")
        key = m.group(1)
        if key in values:
            raise _bad(text, f"{key} given twice")
        try:
            values[key] = _KEYS[key](m.group(2))
        except ValueError:
            raise _bad(text, f"{key}={m.group(2)} is not a number") from None
    if "temperature" not in values:
        raise _bad(text, "temperature is required")
    t, p, k = float(values["temperature"]), float(values.get("top_p", 1.0)), int(values.get("top_k", 0))
    if not math.isfinite(t) or t <= 0:
        raise _bad(text, f"temperature={t:g} (greedy is the default: leave --sample out)")
    if not (0 < p <= 1):
        raise _bad(text, f"top_p={p:g}")
    if k < 0:
        raise _bad(text, f"top_k={k}")
    return SampleSpec(temperature=t, top_p=p, top_k=k, samples=samples, seed=int(seed))


def noise_seed(spec: SampleSpec, key: tuple, sample: int, position: int) -> int:
    """The generator seed of one (question, sample, position): a hash, so no draw depends on another."""
    text = f"{spec.seed}|{key[0]}|{key[1]}|{key[2]}|{sample}|{position}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def gumbel(spec: SampleSpec, key: tuple, sample: int, position: int, vocab: int) -> torch.Tensor:
    """g_v = −log(−log u_v), u_v uniform in (0, 1), float64, on the CPU."""
    gen = torch.Generator().manual_seed(noise_seed(spec, key, sample, position))
    u = torch.rand(vocab, dtype=torch.float64, generator=gen).clamp_(1e-300, 1.0 - 1e-16)
    return -torch.log(-torch.log(u))


def warp(spec: SampleSpec, logits: torch.Tensor) -> torch.Tensor:
    """z / T with the tokens outside top-k and outside the nucleus (the smallest set of most likely
    tokens whose probability reaches top_p) set to −inf; float64, one row per distribution."""
    z = logits.double() / spec.temperature
    if spec.top_k and spec.top_k < z.shape[-1]:
        kth = z.topk(spec.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if spec.top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        before = sorted_z.softmax(-1).cumsum(-1) - sorted_z.softmax(-1)  # mass of the more likely tokens
        drop = before >= spec.top_p
        z = z.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return z


def draw(spec: SampleSpec, logits: torch.Tensor, keys: list[tuple], sample: int, position: int) -> torch.Tensor:
    """The tokens drawn for one step: argmax(warp(z) + g) per row, g from (key, sample, position)."""
    z = warp(spec, logits)
    noise = torch.stack([gumbel(spec, k, sample, position, z.shape[-1]) for k in keys]).to(z.device)
    return (z + noise).argmax(-1)


class SyncedSampling:
    """A transformers ``LogitsProcessor``: the scores become warp(z) + g, so greedy decoding draws the sample.

    `width` is the padded prompt length of the batch (the position of a step is the number of tokens
    generated before it); `keys` one per row, in batch order.
    """

    def __init__(self, spec: SampleSpec, keys: list[tuple], sample: int, width: int) -> None:
        self.spec, self.keys, self.sample, self.width = spec, list(keys), sample, width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        z = warp(self.spec, scores)
        t = input_ids.shape[1] - self.width
        noise = torch.stack([gumbel(self.spec, k, self.sample, t, z.shape[-1]) for k in self.keys]).to(z.device)
        return (z + noise).to(torch.float32)


def generate_kwargs(spec: SampleSpec, keys: list[tuple], sample: int, width: int, kwargs: dict) -> dict:
    """The task's generate kwargs with its sampling settings replaced by synchronised sampling."""
    from transformers import LogitsProcessorList

    out = {k: v for k, v in kwargs.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}
    out["do_sample"] = False
    out["logits_processor"] = LogitsProcessorList([SyncedSampling(spec, keys, sample, width)])
    return out


def matched_share(parent, child) -> float | None:
    """The share of positions, over the longer generation, where the two generations hold the same token."""
    n = max(len(parent), len(child))
    if n == 0:
        return None
    return sum(1 for a, b in zip(parent, child, strict=False) if int(a) == int(b)) / n


def extra_samples(lm, runner, ctxs: list[list[int]], until: list[str], max_gen: int, kwargs: dict,
                  keys: list[tuple]) -> list[list[list[int]]]:
    """Samples 1 .. samples-1 of each context (sample 0 is the one lm-eval scores): per row, their tokens."""
    spec = lm.sampling
    rows: list[list[list[int]]] = [[] for _ in ctxs]
    for s in range(1, spec.samples if spec is not None else 1):
        for row, (_text, toks) in zip(rows, lm._generate(runner, ctxs, until, max_gen, kwargs, keys=keys, sample=s),
                                      strict=True):
            row.append(list(toks))
    return rows


def set_samples(rec, extra: list[list[int]] | None) -> None:
    """Store the extra samples on a record: their tokens concatenated and each one's length."""
    import numpy as np

    if extra:
        rec.samples_ids = np.asarray([t for toks in extra for t in toks], dtype=np.int32)
        rec.samples_lens = [len(toks) for toks in extra]


def split_samples(rec) -> list[list[int]]:
    """The extra samples of a record, each as a token list (none for a greedy record)."""
    lens = getattr(rec, "samples_lens", None) or []
    ids = getattr(rec, "samples_ids", None)
    out, o = [], 0
    for n in lens:
        out.append([int(t) for t in ids[o : o + n]])
        o += n
    return out
