"""What flipcheck changes inside vLLM while its own scoring requests run, and only then.

flipcheck asks vLLM for whole next-token distributions (``prompt_logprobs=-1``, ``logprobs=-1``).
vLLM's public path is built for a few top log-probs, and two of its steps cost as much as the model or more:

1. **The sort.** For ``prompt_logprobs=-1`` vLLM 0.32's V1 model runner (the one its CPU build runs)
   calls ``Sampler.gather_logprobs(logprobs, num_logprobs=V, token_ids)``, which ranks the whole
   vocabulary with ``torch.topk(logprobs, V)`` at every prompt row: a sort of 49k values per position,
   about as long as a 135M model's forward on a 2-core CPU. flipcheck scatters the rows back into
   token order anyway, so while its requests run :func:`unsorted_gather` returns the same log-probs
   in token order (column 0 the prompt token's log-prob, then ids ``0..V-1``): the same numbers, bit
   for bit, without the sort (nor the rank of each prompt token, which only vLLM's Python objects read).
   The sample side (``logprobs=-1``: the first generated token's row) goes through the same call.
2. **Python objects.** vLLM's output processor turns each (position, token) pair into Python objects;
   :func:`keep_tensors` keeps the arrays its engine core made instead (``flipcheck_tensors`` on the
   request's log-prob container).

Both are hooks on vLLM's classes, active only inside :func:`own_requests`; where vLLM is laid out
otherwise nothing is hooked and the public lists are read (same numbers, slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_STATE = {"keep": False, "unsorted": False}  # what the hooks do now (both off outside own_requests)
UNSORTED_ROWS = [0]  # whole-vocabulary rows unsorted_gather gave in token order (a count, for tests)


@contextlib.contextmanager
def own_requests(keep: bool, unsorted: bool) -> Iterator[None]:
    """The hooks act for the requests run inside this block: `keep` (log-probs stay tensors) and
    `unsorted` (whole-vocabulary prompt rows without the sort)."""
    before = dict(_STATE)
    _STATE.update(keep=keep, unsorted=unsorted)
    try:
        yield
    finally:
        _STATE.update(before)


def keep_tensors() -> bool:
    """Let vLLM's output processing keep log-probs as the arrays its engine core made, instead of turning
    every (position, token) pair into Python objects: for the whole vocabulary that turning is ~80 %
    of the time (about 30 ms a position for 49k tokens on a 2-core CPU; the model's forward is 3).
    Hooks on ``LogprobsProcessor._update_prompt_logprobs`` and ``_update_sample_logprobs`` (vLLM 0.32's
    output processor). Returns whether the hooks are in place."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    hooks = {"_update_prompt_logprobs": "prompt_logprobs", "_update_sample_logprobs": "logprobs"}
    originals = {name: getattr(LogprobsProcessor, name, None) for name in hooks}
    if any(f is None for f in originals.values()):
        return False
    if all(getattr(f, "_flipcheck", False) for f in originals.values()):
        return True

    def hook(name: str, container: str):
        original = originals[name]

        def update(self, arrays):
            if not _STATE["keep"]:
                return original(self, arrays)
            target = getattr(self, container)
            kept = getattr(target, "flipcheck_tensors", None)
            if kept is None:
                kept = target.flipcheck_tensors = []
            # (positions, k) token ids and log-probs: torch tensors (prompt) or numpy arrays (sample)
            ids, lps = torch.as_tensor(arrays[0]), torch.as_tensor(arrays[1])
            if token_order(ids):  # unsorted_gather's rows: the log-probs alone, no ids to keep
                kept.append((None, lps[:, 1:]))  # the request's own buffer (V1: LogprobsTensors.empty_cpu)
            else:
                kept.append((ids.clone(), lps.clone()))

        update._flipcheck = True  # type: ignore[attr-defined]
        return update

    for name, container in hooks.items():
        setattr(LogprobsProcessor, name, hook(name, container))
    return True


def token_order(ids: torch.Tensor) -> bool:
    """Whether (rows, V + 1) ids are :func:`unsorted_gather`'s layout: -1 in column 0, then 0..V-1 (a
    sorted row could begin 0, 1, ... by chance, never with -1)."""
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        return False
    every = torch.arange(-1, ids.shape[1] - 1, dtype=ids.dtype).expand(ids.shape[0], -1)
    return torch.equal(ids, every)


def unsorted_gather() -> bool:
    """Hook ``Sampler.gather_logprobs`` (vLLM 0.32's V1 sampler, which its V1 model runner calls for
    prompt log-probs, and the sampler for ``logprobs=-1``, which the input batch turns into V): asked for the whole vocabulary while ``own_requests(keep=True, unsorted=True)``
    is active, it returns the rows in token order instead of sorted by ``torch.topk``, without the
    prompt token's id and rank (-1 and 0: only vLLM's Python objects read them, and
    :func:`keep_tensors` skips those). Returns whether the hook is in place."""
    try:
        from vllm.v1.outputs import LogprobsTensors
        from vllm.v1.sample.sampler import Sampler
    except ImportError:
        return False
    original = Sampler.__dict__.get("gather_logprobs")
    if not isinstance(original, staticmethod):
        return False
    if getattr(original.__func__, "_flipcheck", False):
        return True
    sorted_gather = original.__func__

    def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
        n, vocab = logprobs.shape
        if not (_STATE["unsorted"] and _STATE["keep"]) or num_logprobs < vocab or n == 0:
            return sorted_gather(logprobs, num_logprobs, token_ids)
        token = token_ids.unsqueeze(-1)
        # ids: one row -1, 0..V-1 seen n times (a view, nothing written); column 0 (vLLM's copy of the
        # prompt token) and the ranks are read only by vLLM's Python objects, which keep_tensors skips
        ids = torch.arange(-1, vocab, dtype=torch.int32, device=logprobs.device).expand(n, vocab + 1)
        ranks = torch.zeros(n, dtype=torch.int64, device=logprobs.device)
        UNSORTED_ROWS[0] += n
        return LogprobsTensors(ids, torch.cat((logprobs.gather(-1, token), logprobs), dim=1), ranks)

    gather_logprobs._flipcheck = True  # type: ignore[attr-defined]
    Sampler.gather_logprobs = staticmethod(gather_logprobs)
    return True
