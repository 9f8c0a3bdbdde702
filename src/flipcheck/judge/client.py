"""The judge behind an OpenAI-compatible endpoint: preflight, retries with back-off, a disk cache, threads.

Uses the official ``openai`` client with ``base_url`` = the endpoint, so a hosted API, ``vllm
serve`` and ``transformers serve`` all work. The API key is read from an environment variable
(never from a flag, never written anywhere); a local server needs none.

Every verdict is cached as one small JSON file under ``CACHE/judge/verdicts/``, keyed by the
judge model, the grading prompt version, the whole grading prompt (which holds the conversation,
the answer or answers in their order, and any reference) and the reply length limit: an
interrupted run resumes without asking the judge twice, and nothing is reused across a change
of judge or of grading prompt. Calls that fail after every retry are recorded as failed, never
cached, and asked again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.files import cache_root, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how it is asked."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 512  # the judge's reply: a short reason and the verdict
    concurrency: int = 4  # requests in flight at once
    timeout: float = 120.0  # seconds per request
    retries: int = 5  # after the first try, on 429 / 5xx / connection errors
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one (capped at 60)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise FlipcheckError(f"--judge-url {self.url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        if not self.model:
            raise FlipcheckError("--judge-model: name the judge model the endpoint serves")
        if self.concurrency < 1:
            raise FlipcheckError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.max_tokens < 1 or self.retries < 0 or self.timeout <= 0:
            raise FlipcheckError("judge: max_tokens >= 1, retries >= 0 and timeout > 0 are required")

    def public(self) -> dict[str, Any]:
        """What a report records: everything but secrets (the key's variable name, never its value)."""
        return {"url": self.url, "model": self.model, "api_key_env": self.api_key_env, "max_tokens": self.max_tokens}


@dataclass
class Verdict:
    """One judge call's outcome: the reply, or the error after every retry."""

    key: str
    reply: str | None
    error: str | None = None
    cached: bool = False


class JudgeError(Exception):
    """A judge call that cannot succeed by retrying (4xx other than 429), or that ran out of retries."""


def _retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError | openai.RateLimitError | openai.InternalServerError):
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code >= 500 or err.status_code in (408, 409, 429))


def _retry_after(err: Exception) -> float | None:
    resp = getattr(err, "response", None)
    value = resp.headers.get("retry-after") if resp is not None and hasattr(resp, "headers") else None
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


class JudgeClient:
    """Asks the judge, with bounded concurrency, retries with exponential back-off, and a disk cache."""

    def __init__(self, settings: JudgeSettings, *, cache_dir: str | Path | None = None, use_cache: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import openai

        self.settings = settings
        key = os.environ.get(settings.api_key_env) or "not-needed"  # a local server takes any key
        self._client = openai.OpenAI(base_url=settings.url, api_key=key, timeout=settings.timeout, max_retries=0)
        root = Path(cache_dir) if cache_dir is not None else cache_root()
        self.cache = root / "judge" / "verdicts"
        self.use_cache = use_cache
        self._sleep = sleep
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests made (retries included): a resumed run makes none
        self.seconds = 0.0  # wall time of the calls that got a reply (retries and back-off included)
        self.answered = 0  # verdicts the judge gave in this run (not from the cache)
        self.reached = False  # set by a successful preflight: asked once per client at most

    # -- one call ------------------------------------------------------------------------------------

    def _complete(self, prompt: str, max_tokens: int) -> str:
        with self._lock:
            self.requests += 1
        resp = self._client.chat.completions.create(
            model=self.settings.model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
            max_tokens=max_tokens,
        )
        if not resp.choices:
            return ""
        return resp.choices[0].message.content or ""

    def _with_retries(self, prompt: str, max_tokens: int, retries: int, *, connection: bool = True) -> str:
        import openai

        for attempt in range(retries + 1):
            try:
                return self._complete(prompt, max_tokens)
            except Exception as err:
                refused = isinstance(err, openai.APIConnectionError) and not connection
                if refused or not _retryable(err) or attempt == retries:
                    raise
                wait = _retry_after(err)
                if wait is None:
                    wait = min(60.0, self.settings.backoff * 2 ** attempt) * (1.0 + 0.25 * random.random())
                log.info("judge call failed (%s); retry %d/%d in %.1f s", _one_line(err), attempt + 1, retries, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")

    # -- preflight -----------------------------------------------------------------------------------

    def preflight(self) -> None:
        """One tiny call before any generation: unreachable endpoint, refused key or unknown model -> one line.

        Asked once per client: a second call after a successful one sends nothing.
        """
        import openai

        if self.reached:
            return
        s = self.settings
        try:
            # a busy server (429/5xx) is waited for; a refused connection fails at once
            self._with_retries("Reply with the word ok.", 1, min(2, s.retries), connection=False)
            self.reached = True
        except openai.AuthenticationError as err:
            raise FlipcheckError(
                f"judge {s.url}: the endpoint refused the API key ({_one_line(err)}); set ${s.api_key_env}"
                " or name another variable with --judge-api-key-env") from None
        except openai.NotFoundError as err:
            raise FlipcheckError(f"judge {s.url}: model {s.model!r} or the chat endpoint not found ({_one_line(err)});"
                                 " check --judge-model and that --judge-url ends in /v1") from None
        except openai.APIConnectionError as err:
            raise FlipcheckError(f"judge {s.url}: unreachable ({_one_line(err)}); is the server running?") from None
        except openai.APIStatusError as err:
            raise FlipcheckError(f"judge {s.url} with model {s.model!r}: HTTP {err.status_code} ({_one_line(err)})") from None

    # -- many calls, cached ---------------------------------------------------------------------------

    def key(self, kind: str, prompt: str, version: str) -> str:
        blob = json.dumps({"judge_model": self.settings.model, "grader_version": version, "kind": kind,
                           "prompt": prompt, "max_tokens": self.settings.max_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache / key[:2] / f"{key}.json"

    def _cached_reply(self, key: str, *, warn: bool = True) -> str | None:
        """The cached reply under `key`, or None (no cache, no file, or an unreadable one)."""
        path = self._path(key)
        if not (self.use_cache and path.is_file()):
            return None
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (ValueError, KeyError):
            if warn:
                log.warning("%s: unreadable cached verdict; asking again", path)
            return None
        return reply if isinstance(reply, str) else None

    def is_cached(self, key: str) -> bool:
        """True when :meth:`ask` would answer `key` from the cache, without the judge."""
        return self._cached_reply(key, warn=False) is not None

    def ask(self, key: str, prompt: str, meta: dict[str, Any]) -> Verdict:
        path = self._path(key)
        cached = self._cached_reply(key)
        if cached is not None:
            return Verdict(key, cached, cached=True)
        t0 = time.perf_counter()
        try:
            reply = self._with_retries(prompt, self.settings.max_tokens, self.settings.retries)
        except Exception as err:
            return Verdict(key, None, error=_one_line(err))
        with self._lock:
            self.seconds += time.perf_counter() - t0
            self.answered += 1
        if self.use_cache:
            write_json_atomic(path, {**meta, "judge_model": self.settings.model, "prompt": prompt, "reply": reply})
        return Verdict(key, reply)

    def ask_many(self, items: Sequence[tuple[str, str, dict[str, Any]]],
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Verdict]:
        """Ask every (key, prompt, meta) once (duplicates once), `concurrency` at a time."""
        unique = {k: (p, m) for k, p, m in items}
        out: dict[str, Verdict] = {}
        pool = ThreadPoolExecutor(max_workers=self.settings.concurrency)
        try:
            futures = {k: pool.submit(self.ask, k, p, m) for k, (p, m) in unique.items()}
            for i, (k, f) in enumerate(futures.items(), 1):
                out[k] = f.result()
                if progress is not None:
                    progress(i, len(futures))
        except BaseException:  # Ctrl-C: drop the queued calls; answered ones are already cached
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return out
