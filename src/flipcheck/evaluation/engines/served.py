"""A model already served behind an OpenAI-compatible ``/v1/completions`` (``vllm serve`` and the like).

Requests carry token-id prompts, so the served model sees exactly the ids the parent saw. Two ways a
server can return what scoring needs, found by a preflight before any work:

- ``prompt_logprobs`` (vLLM's extra field): for every prompt position the log-probability of the
  actual token and of the top-K tokens, keyed by token id. Option log-likelihoods, flips, option KL,
  margins and top-1 agreement are exact; the vocabulary KL is the top-K + tail-bucket lower bound
  (:func:`flipcheck.evaluation.kl.kl_bucket_bound`).
- ``echo`` + ``logprobs`` (the OpenAI completions API): the actual tokens' log-probabilities only,
  which still give option log-likelihoods and flips; the distribution-based figures are not there.

A server with neither is refused in one line, as is a server that cannot be reached. The API key comes
from the environment only (``FLIPCHECK_API_KEY``, else ``OPENAI_API_KEY``), never from the command
line, and is never written anywhere. The server is contacted only when a served model must be scored:
a re-run whose results are cached works with the server down.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.base import GENERATES, NEEDS_TARGETS, REMOTE, TOPK, Engine, cut_at_stop
from flipcheck.evaluation.engines.registry import register_engine
from flipcheck.evaluation.engines.vllm import _BatchRunner

log = logging.getLogger(__name__)

API_KEY_ENVS = ("FLIPCHECK_API_KEY", "OPENAI_API_KEY")
INSTALL_HINT = 'pip install "flipcheck[judge]"  (the openai client)'
MODES = ("prompt_logprobs", "echo")
REQUEST_BATCH = 32  # prompts per HTTP request


def api_key() -> str:
    for name in API_KEY_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return "EMPTY"  # vLLM without --api-key accepts any


def base_url(url: str) -> str:
    """``http://host:port`` or ``.../v1`` -> the OpenAI client's base URL (ending in /v1)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise FlipcheckError(f"--child-url {url!r}: give an http:// or https:// URL of an OpenAI-compatible server")
    return url if url.endswith("/v1") else url + "/v1"


class ServedEngine(Engine):
    """A served model, named by the server's URL and its model name; `topk` log-probs per position."""

    name = "served"
    capabilities = frozenset({TOPK, NEEDS_TARGETS, GENERATES, REMOTE})  # its source is a URL, not a ModelSource

    def __init__(self, url: str, model: str, *, topk: int, timeout: float = 600.0) -> None:
        self.url = base_url(url)
        self.model_name = model
        self.topk = int(topk)
        self.timeout = float(timeout)
        self._vocab: int | None = None
        self._client = None
        self.mode: str | None = None  # found by the preflight
        self.server: dict[str, Any] = {}
        self._runner = None

    # -- identity ----------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Known without contacting the server (it enters the cache keys: a cached re-run needs no server)."""
        return {"name": self.name, "api": "openai /v1/completions", "url": self.url, "model": self.model_name,
                "logprobs": self.topk}

    def fingerprint(self) -> str:
        return "served:" + hashlib.sha256(f"{self.url}\n{self.model_name}".encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"served {self.model_name} at {self.url}"

    def bind(self, vocab: int) -> None:
        """The width of a distribution: the parent's vocabulary (the server's model must share it)."""
        self._vocab = int(vocab)

    @property
    def vocab(self) -> int:
        if self._vocab is None:
            raise FlipcheckError(f"{self.label()}: its vocabulary width is not known (bind it to the parent's)")
        return self._vocab

    def runner(self):
        self.connect()
        if self._runner is None:
            self._runner = _BatchRunner(self, None)
            self._runner.topk_only = self.topk if self.mode == "prompt_logprobs" else 0
            self._runner.needs_targets = True
        return self._runner

    # -- the server --------------------------------------------------------------------------------
    def connect(self) -> None:
        """Reach the server and find what it returns (prompt_logprobs, else echo + logprobs); one line
        and exit 2 when it is down, does not serve the model, or returns neither."""
        if self.mode is not None:
            return
        try:
            import openai
        except ImportError as err:
            raise FlipcheckError(f"a served model needs the openai client, which is not installed: {INSTALL_HINT}") from err
        self._client = openai.OpenAI(base_url=self.url, api_key=api_key(), timeout=self.timeout, max_retries=0)
        try:
            models = [m.id for m in self._client.models.list().data]
        except openai.APIConnectionError as err:
            raise FlipcheckError(f"cannot reach the server at {self.url}: {_first(err)} (is it running?)") from err
        except openai.APIStatusError as err:
            raise FlipcheckError(f"the server at {self.url} refused /models: HTTP {err.status_code} {_first(err)}") from err
        if self.model_name not in models:
            raise FlipcheckError(f"the server at {self.url} does not serve {self.model_name!r}; it serves: {', '.join(models)}")
        probe = [1, 2, 3]
        try:
            choice = self._complete([probe], probing=True, prompt_logprobs=self.topk)[0]
            rows = _extra(choice, "prompt_logprobs")
            if isinstance(rows, list) and len(rows) == len(probe):
                self.mode = "prompt_logprobs"
                return
        except openai.APIStatusError as err:
            if err.status_code == 400 and "logprobs" in str(err).lower() and "max" in str(err).lower():
                raise FlipcheckError(
                    f"the server at {self.url} returns fewer log-probs per position than the {self.topk} flipcheck "
                    f"keeps of the parent: start vLLM with --max-logprobs {self.topk} ({_first(err)})") from err
            log.info("%s: prompt_logprobs refused (%s); trying echo + logprobs", self.url, _first(err))
        try:
            choice = self._complete([probe], probing=True, echo=True, logprobs=1)[0]
            lp = getattr(choice, "logprobs", None)
            if lp is not None and len(lp.token_logprobs or []) >= len(probe):
                self.mode = "echo"
                log.warning("%s serves echo + logprobs only: option scores and flips are exact, the "
                            "distribution figures (KL, top-1 agreement) are not available", self.label())
                return
        except openai.APIStatusError as err:
            log.info("%s: echo + logprobs refused (%s)", self.url, _first(err))
        raise FlipcheckError(
            f"the server at {self.url} returns neither prompt_logprobs nor echo + logprobs for token-id prompts; "
            f"flipcheck needs one of them (vLLM: start it with --max-logprobs {self.topk} or more)"
        )

    def _complete(self, prompts: list[list[int]], probing: bool = False, **kw) -> list[Any]:
        import openai

        extra = {k: kw.pop(k) for k in ("prompt_logprobs", "return_tokens_as_token_ids") if k in kw}
        kw.setdefault("max_tokens", 1)
        try:
            resp = self._client.completions.create(model=self.model_name, prompt=prompts, temperature=0.0,
                                                   extra_body=extra or None, **kw)
        except openai.APIConnectionError as err:
            raise FlipcheckError(f"lost the server at {self.url}: {_first(err)}") from err
        except openai.APIStatusError as err:
            if probing:
                raise
            raise FlipcheckError(f"the server at {self.url} answered HTTP {err.status_code}: {_first(err)}") from err
        return sorted(resp.choices, key=lambda c: c.index)

    # -- scoring -----------------------------------------------------------------------------------
    def rows_at(self, seqs: list[list[int]], positions: list[list[int]],
                targets: list[dict[int, list[int]]] | None = None) -> list[torch.Tensor]:
        """Rows at `positions` of each sequence. The distribution after a sequence's last token is read
        from prompts that end in each target scored there (`targets`), so every target's log-prob is
        exact even outside the server's top-K (lm-eval's inputs end one token before the continuation's
        last); the listed entries of those prompts are merged."""
        self.connect()
        prompts: list[list[int]] = []
        plan: list[list[int]] = []  # per sequence: the prompts it reads
        for i, (seq, ps) in enumerate(zip(seqs, positions, strict=True)):
            last = [t for p in ps if p == len(seq) - 1 for t in (targets[i].get(p, []) if targets else [])]
            if any(p == len(seq) - 1 for p in ps) and not last:
                raise FlipcheckError(f"{self.label()}: scoring after the last prompt token needs the target tokens")
            ends = [list(seq) + [t] for t in dict.fromkeys(last)] or [list(seq)]
            plan.append(list(range(len(prompts), len(prompts) + len(ends))))
            prompts += ends
        entries: list[list] = []
        for s in range(0, len(prompts), REQUEST_BATCH):
            part = prompts[s : s + REQUEST_BATCH]
            if self.mode == "prompt_logprobs":
                entries += [_extra(c, "prompt_logprobs") for c in self._complete(part, prompt_logprobs=self.topk)]
            else:  # echo: the actual tokens' log-probs only
                entries += [[None] + [{str(t): v} for t, v in zip(q[1:], c.logprobs.token_logprobs[1 : len(q)], strict=True)]
                            for q, c in zip(part, self._complete(part, echo=True, logprobs=1), strict=True)]
        blocks = []
        for ps, reads in zip(positions, plan, strict=True):
            rows = []
            for p in ps:
                listed: dict[int, float] = {}
                for r in reads:
                    for tok, v in (entries[r][p + 1] or {}).items():
                        listed[int(tok)] = float(v["logprob"] if isinstance(v, dict) else v)
                rows.append(self._dense(listed))
            blocks.append(torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, self.vocab)))
        return blocks

    def _dense(self, listed: dict[int, float]) -> np.ndarray:
        """A float32 row from the listed log-probs; the rest of the mass spread evenly over the unlisted
        tokens, so the row is a distribution whose listed entries are exact and whose top-k are the
        server's (an unlisted token gets at most the k-th listed one's mass)."""
        row = np.full(self.vocab, -np.inf, dtype=np.float64)
        ids = np.fromiter(listed, dtype=np.int64, count=len(listed))
        lps = np.fromiter(listed.values(), dtype=np.float64, count=len(listed))
        if len(ids) and int(ids.max()) >= self.vocab:
            raise FlipcheckError(f"{self.label()}: token id {int(ids.max())} is outside the parent's vocabulary "
                                 f"({self.vocab}); the served model's vocabulary differs")
        rest = -math.expm1(float(np.logaddexp.reduce(lps))) if len(lps) else 1.0
        unlisted = self.vocab - len(ids)
        if rest > 0 and unlisted > 0:
            row[:] = math.log(rest / unlisted)
        row[ids] = lps
        return row.astype(np.float32)

    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int):
        raise FlipcheckError(f"{self.label()}: text corpora (--text) of a served model are not supported yet; "
                             "run the model in process (--engine vllm or transformers)")

    def generate(self, ctxs: list[list[int]], max_new: int, stop_fn, eos_ids: set[int]) -> list[list[int]]:
        """Greedy continuations; token ids back through vLLM's ``return_tokens_as_token_ids``."""
        self.connect()
        out = []
        for ctx in ctxs:
            choice = self._complete([list(ctx)], max_tokens=max_new, logprobs=1, return_tokens_as_token_ids=True)[0]
            tokens = [int(str(t).rsplit(":", 1)[-1]) for t in (choice.logprobs.tokens if choice.logprobs else [])]
            out.append(cut_at_stop(tokens, stop_fn, eos_ids))
        return out

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _extra(choice, name: str):
    value = getattr(choice, name, None)
    if value is None and getattr(choice, "model_extra", None):
        value = choice.model_extra.get(name)
    return value


def _first(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


register_engine(ServedEngine, selectable=False)  # reached by --child-url / --parent-url, not --engine
