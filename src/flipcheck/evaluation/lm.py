"""flipcheck's scoring LM: an lm-evaluation-harness ``LM`` that scores a model, optionally against its
parent, and records what it produced per instance.

lm-eval builds the requests from its own task configs; :class:`FlipLM` answers them and records, per
instance, what each model produced (:class:`~flipcheck.evaluation.records.Record`). Tokenization is
lm-eval's own (``TemplateLM._encode_pair``, the ``prefix_token_id`` for an empty context, HFLM's
``tok_encode`` and left truncation ``(ctx + cont)[-(max_length + 1):][:-1]``), so log-likelihoods
agree with lm-eval's HF backend and the chosen answers are the same.

Requests are grouped by their context and each distinct context is run once for all its options
(:mod:`~flipcheck.evaluation.packing`); requests whose context plus continuation does not fit
``max_length`` are scored alone, left truncated exactly as HFLM does. The model runs in
:mod:`~flipcheck.evaluation.forward`; the vocabulary KL (Dutta et al. 2024, arXiv 2407.09141;
llama.cpp ``--kl-divergence``) is :mod:`~flipcheck.evaluation.kl`. :class:`ReplayLM` answers from
recorded results, so lm-eval computes a model's metrics without running it again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from lm_eval.api.model import LM, TemplateLM
from tqdm.auto import tqdm

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import decoding
from flipcheck.evaluation.engines import Engine, as_engine
from flipcheck.evaluation.forward import ModelRunner, Scored, ScoreSetup, Side, concat_sides, score_items
from flipcheck.evaluation.generations import finish_reason
from flipcheck.evaluation.kl import DEFAULT_TAIL_SAMPLES, DEFAULT_TOPK
from flipcheck.evaluation.packing import position_keys
from flipcheck.evaluation.records import InstanceKey, Record, args_hash, instance_key, nonfinite_by_task
from flipcheck.evaluation.sampling import extra_samples, set_samples

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger(__name__)

_ENCODE_MEMO = 4096  # encodings kept for repeats (a document's options follow one another)

DEFAULT_MAX_LENGTH = 2048  # HFLM's default when neither the config nor the tokenizer sets one


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


class FlipLM(TemplateLM):
    """lm-eval ``LM`` scoring `model`, optionally against a reference (the parent).

    ``reference`` is None (score only; records carry top-K so they can be cached as a parent), a model
    (lock-step: both models run on the same packed input, exact KL over the whole vocabulary at each
    scored position; ``reference_records`` gets the reference's answers, made on THIS model's inputs:
    its tokenizer and max length), or a dict of the parent's :class:`Record` (the KL from its stored
    top-K and sampled tail, :func:`~flipcheck.evaluation.kl.kl_topk_tail_tensors`). lm-eval always
    receives THIS model's answers. A parent's own results (the ones cached) come from a FlipLM of the
    parent alone, so they never depend on a child.
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
        topk: int = DEFAULT_TOPK,
        tail_samples: int = DEFAULT_TAIL_SAMPLES,
        max_gen_toks: int = 256,
        progress: bool = True,
        reference_tokenizer=None,
        add_bos_token: bool | None = None,
        ref_tail: bool = True,
        sampling=None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FlipcheckError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise FlipcheckError(f"max_length={max_length!r}: must be None (the model's) or an integer >= 2")
        if not isinstance(topk, int) or topk < 1:
            raise FlipcheckError(
                f"topk={topk!r}: must be an integer >= 1 (the parent log-probs kept per position for the KL bound)"
            )
        if not isinstance(tail_samples, int) or tail_samples < 0:
            raise FlipcheckError(f"tail_samples={tail_samples!r}: must be an integer >= 0")
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise FlipcheckError(f"max_gen_toks={max_gen_toks!r}: must be an integer >= 1")

        if reference is not None and not isinstance(reference, (torch.nn.Module, Engine, dict)):
            raise FlipcheckError(
                f"reference of type {type(reference).__name__}: allowed are None, a model or engine (lock-step) "
                "or a dict of Records (cached parent)"
            )
        self.tokenizer = tokenizer
        self.engine = as_engine(model)
        self.model = getattr(self.engine, "model", None)
        self.batch_size = batch_size
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self.progress = progress
        self.add_bos_token = add_bos_token
        self.ref_tail = ref_tail  # False: the vocabulary KL is the top-K + tail-bucket bound (kl="bound")
        self.records: dict[InstanceKey, Record] = {}
        self.reference_records: dict[InstanceKey, Record] = {}
        self._runner = self.engine.runner()
        self.topk = min(topk, self._runner.vocab)
        # a run without a reference makes records that can serve as one: sample their tails
        self.tail_samples = tail_samples if reference is None and self.topk < self._runner.vocab else 0
        self._ref_runner: ModelRunner | None = None
        self._ref_records: dict[InstanceKey, Record] | None = None
        if isinstance(reference, (torch.nn.Module, Engine)):
            if reference_tokenizer is not None:
                check_same_vocabulary(tokenizer, reference_tokenizer)
            self._ref_runner = as_engine(reference).runner()
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
        self.sampling = sampling  # a SampleSpec: seed-synchronised sampling (evaluation/sampling.py); None: greedy
        if sampling is not None and any(getattr(r, "engine", None) is not None for r in runners):
            raise FlipcheckError("--sample: only the transformers engine samples in step with the parent for now; "
                                 "llama.cpp, vLLM and served models generate greedily (leave --sample out)")

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

        own = self.engine.max_length()  # an engine with a fixed context (llama.cpp's n_ctx)
        return own or resolve_max_length(
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

        # lm-eval encodes a document's context once per option, right after one another: a small LRU
        # memo catches every repeat (context+option strings never repeat and are evicted at once)
        memo = self.__dict__.setdefault("_encode_memo", OrderedDict())
        key = (string, add_special_tokens, left_truncate_len)
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
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
        memo[key] = tuple(enc)
        if len(memo) > _ENCODE_MEMO:
            memo.popitem(last=False)
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
    @property
    def nonfinite(self) -> dict[str, int]:
        """Distinct scored positions with NaN/inf logits of this model, per task."""
        return nonfinite_by_task(self.records)

    @property
    def reference_nonfinite(self) -> dict[str, int]:
        return nonfinite_by_task(self.reference_records)

    # ---- the scoring core -------------------------------------------------------------------------

    def _setup(self) -> ScoreSetup:
        return ScoreSetup(
            runner=self._runner, max_length=self.max_length, pack=self._pack, window=self._window,
            pad_id=self._pad_id, batch_size=self.batch_size, topk=self.topk, tail_samples=self.tail_samples,
            ref_tail=self.ref_tail,
        )

    def _score(
        self,
        items: list[tuple[list[int], list[int]]],
        *,
        lockstep: bool = False,
        ref_topk: list[tuple] | None = None,
        desc: str = "scoring",
        disable_tqdm: bool = False,
    ) -> list[Scored]:
        """Score items with this model, and with the reference when `lockstep` (exact KL) or against the
        given reference top-K rows (the top-K + tail bound)."""
        if not items:
            return []
        bar = self._bar(len(items), desc, disable_tqdm)
        try:
            return score_items(
                self._setup(), items, reference=self._ref_runner if lockstep else None, ref_topk=ref_topk,
                on_batch=bar.update,
            )
        finally:
            bar.close()

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
    def _make_record(kind: str, inst: Instance, side: Side | None, **extra) -> Record:
        rec = Record(kind=kind, args_hash=args_hash(inst.args), **extra)
        if side is not None:
            rec.n_tokens = side.n
            rec.topk_logp, rec.topk_ids, rec.token_ids = side.topk_logp, side.topk_ids, side.targets
            rec.tail_logp, rec.tail_ids = side.tail_logp, side.tail_ids
            if "nonfinite" not in extra:
                rec.nonfinite = int(side.nonfinite.sum())
        return rec

    def _warn_nonfinite(self, task: str | None, side: Side | None, who: str) -> None:
        if side is not None and side.nonfinite.any():
            warned = self.__dict__.setdefault("_warned", set())
            if (who, task) not in warned:
                warned.add((who, task))
                log.warning("task %s: NaN/inf %s logits at scored positions; those answers score -inf", task, who)

    # ---- loglikelihood ----------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._instances = list(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)
        finally:
            self._instances = None

    def _cached_topk(self, insts, items) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The parent's stored top-K rows of every request (None without cached parent records)."""
        if self._ref_records is None:
            return None
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
            ref_topk.append((rec.topk_logp, rec.topk_ids, rec.tail_logp, rec.tail_ids))
        return ref_topk

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        insts = (
            self._instances if self._instances is not None and len(self._instances) == len(requests) else None
        )
        items = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        scored = self._score(
            items,
            lockstep=self._ref_runner is not None,
            ref_topk=self._cached_topk(insts, items),
            desc="loglikelihood",
            disable_tqdm=disable_tqdm,
        )
        out = [(res.own.ll, res.own.is_greedy) for res in scored]
        if insts is not None:
            for inst, answer in zip(insts, out, strict=True):
                self.cache_hook.add_partial("loglikelihood", inst.args, answer)
            self._record_loglikelihood(insts, items, scored)
        return out

    def _record_loglikelihood(self, insts, items, scored: list[Scored]) -> None:
        """Records of every request; each distinct scored position of a document counted once."""
        seen: set[tuple[str, int, int]] = set()
        order = sorted(range(len(insts)), key=lambda j: instance_key(insts[j]))
        for j in order:
            inst, res = insts[j], scored[j]
            keys = position_keys(*items[j], self.max_length)
            first = np.array([(inst.task_name, inst.doc_id, h) not in seen for h in keys], dtype=bool)
            seen.update((inst.task_name, inst.doc_id, h) for h in keys)
            self._warn_nonfinite(inst.task_name, res.own, "model")
            self.records[instance_key(inst)] = self._make_record(
                "loglikelihood", inst, res.own, ll=res.own.ll, is_greedy=res.own.is_greedy,
                kl=None if res.kl is None else res.kl[first],
                top1_agree=None if res.agree is None else res.agree[first],
                kl_rev=None if res.kl_rev is None else res.kl_rev[first],
                nonfinite=int(res.own.nonfinite[first].sum()),
            )
            if res.ref is not None:
                self._warn_nonfinite(inst.task_name, res.ref, "reference")
                self.reference_records[instance_key(inst)] = self._make_record(
                    "loglikelihood", inst, res.ref, ll=res.ref.ll, is_greedy=res.ref.is_greedy,
                    nonfinite=int(res.ref.nonfinite[first].sum()),
                )

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
        scored = self._score(
            items,
            lockstep=self._ref_runner is not None,
            ref_topk=self._rolling_ref_topk(requests, items, owners),
            desc="loglikelihood_rolling",
            disable_tqdm=disable_tqdm,
        )
        per_req: dict[int, list[Scored]] = {}
        for res, r in zip(scored, owners, strict=True):
            per_req.setdefault(r, []).append(res)
        out = []
        for r, inst in enumerate(requests):
            ll = self._record_rolling(inst, per_req.get(r, []))
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", inst.args, ll)
        return out

    def _rolling_ref_topk(self, requests, items, owners) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Each window's slice of the parent's stored top-K rows (None without cached parent records)."""
        if self._ref_records is None:
            return None
        ref_topk = []
        offsets: dict[int, int] = {}
        for (_, cont), r in zip(items, owners, strict=True):
            rec = self._cached(requests[r], "loglikelihood_rolling")
            o = offsets.get(r, 0)
            if o + len(cont) > rec.n_tokens:
                raise FlipcheckError(
                    f"the cached parent record for {instance_key(requests[r])} is stale; re-run the parent"
                )
            ref_topk.append(tuple(
                None if a is None else a[o : o + len(cont)]
                for a in (rec.topk_logp, rec.topk_ids, rec.tail_logp, rec.tail_ids)
            ))
            offsets[r] = o + len(cont)
        for r, used in offsets.items():
            if used != self._ref_records[instance_key(requests[r])].n_tokens:
                raise FlipcheckError(
                    f"the cached parent record for {instance_key(requests[r])} is stale; re-run the parent"
                )
        return ref_topk

    def _record_rolling(self, inst: Instance, parts: list[Scored]) -> float:
        own = concat_sides([p.own for p in parts], self.topk)
        ll = own.ll if parts else 0.0
        self._warn_nonfinite(inst.task_name, own, "model")
        kl = np.concatenate([p.kl for p in parts]) if parts and parts[0].kl is not None else None
        agree = np.concatenate([p.agree for p in parts]) if parts and parts[0].agree is not None else None
        rev = np.concatenate([p.kl_rev for p in parts]) if parts and parts[0].kl_rev is not None else None
        self.records[instance_key(inst)] = self._make_record(
            "loglikelihood_rolling", inst, own, ll=ll, is_greedy=own.is_greedy if parts else True,
            kl=kl, top1_agree=agree, kl_rev=rev,
        )
        if self._ref_runner is not None:
            ref = concat_sides([p.ref for p in parts], self.topk)
            self._warn_nonfinite(inst.task_name, ref, "reference")
            self.reference_records[instance_key(inst)] = self._make_record(
                "loglikelihood_rolling", inst, ref, ll=ref.ll if parts else 0.0,
                is_greedy=ref.is_greedy if parts else True,
            )
        return ll

    # ---- generate_until ---------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation as HFLM does it (batched, left-padded, lm-eval's stop sequences and
        ``max_gen_toks``, contexts left-truncated to ``max_length - max_gen_toks``). Then the
        reference's output is teacher-forced through both models for per-token KL and top-1 agreement.
        """
        gen = self._generate_all(requests, disable_tqdm)
        # teacher forcing: this model along its own output (top-K for later use as a reference) and,
        # with a reference, both along the reference's output (KL, top-1 agreement)
        usable = [i for i in range(len(requests)) if gen.contexts[i]]
        ref_tokens, ref_topk = self._reference_outputs(requests, gen, usable)
        ref_items = list(ref_tokens)
        paired = self._score(
            [(gen.contexts[i], ref_tokens[i]) for i in ref_items],
            lockstep=self._ref_runner is not None,
            ref_topk=ref_topk,
            desc="teacher forcing",
            disable_tqdm=disable_tqdm,
        )
        paired_of = dict(zip(ref_items, paired, strict=True))
        same = {i for i in paired_of if ref_tokens[i] == gen.own_toks[i]}  # own output = reference's
        solo_items = [i for i in usable if gen.own_toks[i] and i not in same]
        solo = self._score(
            [(gen.contexts[i], gen.own_toks[i]) for i in solo_items], desc="teacher forcing", disable_tqdm=disable_tqdm
        )
        own_of = dict(zip(solo_items, (s.own for s in solo), strict=True))
        own_of.update({i: paired_of[i].own for i in same})
        for i, inst in enumerate(requests):
            self._record_generation(i, inst, gen, paired_of.get(i), own_of.get(i))
        return gen.texts  # type: ignore[return-value]

    def _generate_all(self, requests: list[Instance], disable_tqdm: bool) -> _Generations:
        """Generate for every request with this model (and the reference, in lock-step)."""
        from lm_eval.models.utils import Collator

        gen = _Generations.empty(len(requests))
        collator = Collator(
            [(i, inst.args) for i, inst in enumerate(requests)],
            sort_fn=lambda x: (-len(self.tok_encode(x[1][0])), x[1][0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1][1],
        )
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            idx = [c[0] for c in chunk]
            until, max_gen, kwargs = self._generation_settings(chunk[0][1][1])
            ctxs = [self._encode_context(c[1][0])[-(self.max_length - max_gen) :] for c in chunk]
            for i, ctx in zip(idx, ctxs, strict=True):
                gen.contexts[i] = ctx
            keys = [instance_key(requests[i]) for i in idx]
            for i, extra in zip(idx, extra_samples(self, self._runner, ctxs, until, max_gen, kwargs, keys), strict=True):
                gen.extra[i] = extra
            for i, (text, toks) in zip(idx, self._generate(self._runner, ctxs, until, max_gen, kwargs, keys), strict=True):
                gen.texts[i], gen.own_toks[i] = text, toks
                gen.finish[i] = self._finish(self._runner, toks, until, max_gen)
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            if self._ref_runner is not None:
                outs = self._generate(self._ref_runner, ctxs, until, max_gen, kwargs, keys)
                for i, extra in zip(idx, extra_samples(self, self._ref_runner, ctxs, until, max_gen, kwargs, keys),
                                    strict=True):
                    gen.ref_extra[i] = extra
                for i, out in zip(idx, outs, strict=True):
                    gen.ref_out[i] = out
                    gen.ref_finish[i] = self._finish(self._ref_runner, out[1], until, max_gen)
            bar.update(len(chunk))
        bar.close()
        return gen

    def _finish(self, runner: ModelRunner, toks: list[int], until: list[str], max_gen: int) -> str:
        """How one generation ended (:func:`~flipcheck.evaluation.generations.finish_reason`)."""
        eos = decoding.eos_ids(getattr(runner, "model", None), self.tokenizer)
        return finish_reason(toks, max_gen, eos, until, lambda t: self.tokenizer.decode(t, skip_special_tokens=True))

    def _generation_settings(self, gen_kwargs) -> tuple[list[str], int, dict]:
        """(stop sequences, max new tokens, the other generate kwargs) of one group of requests."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        if not isinstance(gen_kwargs, dict):
            raise FlipcheckError(
                f"generate_until: generation kwargs must be a dict, got {type(gen_kwargs).__name__}"
            )
        eos_str = (
            self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            if self.eot_token_id is not None
            else None
        )
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_str)
        max_gen = int(kwargs.pop("max_gen_toks"))
        if self.max_length - max_gen <= 0:
            raise FlipcheckError(
                f"max_gen_toks={max_gen} leaves no room for the prompt within max_length={self.max_length}; "
                "lower max_gen_toks or raise max_length"
            )
        return until, max_gen, kwargs

    def _reference_outputs(
        self, requests, gen: _Generations, usable: list[int]
    ) -> tuple[dict[int, list[int]], list[tuple[np.ndarray, np.ndarray]] | None]:
        """The reference's output tokens per request that has one, and (cached parent) their top-K rows."""
        if self._ref_runner is not None:
            return {i: gen.ref_out[i][1] for i in usable if gen.ref_out[i][1]}, None
        if self._ref_records is None:
            return {}, None
        tokens: dict[int, list[int]] = {}
        ref_topk = []
        for i in usable:
            rec = self._cached(requests[i], "generate_until")
            if rec.token_ids is None:
                raise FlipcheckError(
                    f"the cached parent record for {instance_key(requests[i])} has no output tokens; re-run the parent"
                )
            if len(rec.token_ids):
                tokens[i] = [int(t) for t in rec.token_ids]
                ref_topk.append((rec.topk_logp, rec.topk_ids, rec.tail_logp, rec.tail_ids))
        return tokens, ref_topk

    def _record_generation(self, i: int, inst: Instance, gen: _Generations, pair: Scored | None, own: Side | None):
        key = instance_key(inst)
        self._warn_nonfinite(inst.task_name, own, "model")
        rec = self._make_record("generate_until", inst, own, text=gen.texts[i], finish=gen.finish[i])
        set_samples(rec, gen.extra[i])
        if own is None:
            rec.token_ids = np.asarray(gen.own_toks[i], dtype=np.int32)
        if pair is not None:
            rec.kl, rec.top1_agree, rec.kl_rev = pair.kl, pair.agree, pair.kl_rev
            rec.tf_miss = pair.own.argmax != pair.own.targets  # along the reference's output
        elif self._ref_runner is not None or self._ref_records is not None:
            rec.kl, rec.top1_agree, rec.kl_rev = np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.float32)
        self.records[key] = rec
        if self._ref_runner is not None:
            ref_side = pair.ref if pair is not None else None
            ref_rec = self._make_record("generate_until", inst, ref_side, text=gen.ref_out[i][0], finish=gen.ref_finish[i])
            set_samples(ref_rec, gen.ref_extra[i])
            if ref_side is None:
                ref_rec.token_ids = np.asarray(gen.ref_out[i][1], dtype=np.int32)
                ref_rec.topk_logp = np.zeros((0, self.topk), np.float32)
                ref_rec.topk_ids = np.zeros((0, self.topk), np.int32)
            self.reference_records[key] = ref_rec

    def _generate(
        self, runner: ModelRunner, ctxs: list[list[int]], until: list[str], max_gen: int, kwargs: dict,
        keys: list[tuple] | None = None, sample: int = 0,
    ) -> list[tuple[str, list[int]]]:
        """Per request: the post-processed text and the tokens up to where it stopped (:mod:`.decoding`)."""
        return decoding.generate(runner, self.tokenizer, self._pad_id, ctxs, until, max_gen, kwargs,
                                 sampling=self.sampling, keys=keys, sample=sample)


@dataclass
class _Generations:
    """Per request: this model's text and tokens, the reference's (lock-step), the context used."""

    texts: list[str | None]
    own_toks: list[list[int]]
    ref_out: list[tuple[str, list[int]] | None]
    contexts: list[list[int]]
    finish: list[str | None]  # "stop" / "length", this model's and the reference's
    ref_finish: list[str | None]
    extra: list[list[list[int]]]  # --samples N: samples 1..N-1 of this model and of the reference
    ref_extra: list[list[list[int]]]

    @classmethod
    def empty(cls, n: int) -> _Generations:
        return cls([None] * n, [[] for _ in range(n)], [None] * n, [[] for _ in range(n)], [None] * n, [None] * n,
                   [[] for _ in range(n)], [[] for _ in range(n)])


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
