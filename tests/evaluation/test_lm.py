"""FlipLM against lm-eval's own HF backend, KL against hand computations, replay, cached-parent bound."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.kl import kl_exact, kl_from_topk
from flipcheck.evaluation.lm import FlipLM, ReplayLM
from flipcheck.evaluation.packing import attention_allow, plan_rows
from flipcheck.evaluation.records import Record, args_hash

TASKS = ["tiny_letters", "tiny_sentences", "tiny_sums"]
GEN_KWARGS = {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------
# helpers and module fixtures


def evaluate(lm, task_dir):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, log_samples=True, bootstrap_iters=0)
    return out["samples"]


def hflm(model, tok, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=kw.pop("batch_size", 8), device="cpu", **kw)


def instance(kind, args, task, doc_id, idx):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=(task, doc_id, 1))


def ll_instances(n_docs=4):
    """Requests as lm-eval builds them for tiny_sentences (multi-token) and tiny_letters (one token)."""
    from conftest import COLORS

    out = []
    for d in range(n_docs):
        animal = ["cat", "dog", "horse", "mouse"][d % 4]
        q = f"Question: What color is the {animal}?\nAnswer:"
        for j, c in enumerate(COLORS[d : d + 4]):
            out.append(
                instance("loglikelihood", (q, f" The {animal} is {c} and it ran after a ball."), "sent", d, j)
            )
        letters = q.replace("\nAnswer:", "\nA. red\nB. blue\nC. green\nD. white\nAnswer:")
        for j, c in enumerate("ABCD"):
            out.append(instance("loglikelihood", (letters, f" {c}"), "letters", d, j))
    return out


def gen_instances(n=4):
    return [
        instance("generate_until", (f"{i} {2 * i % 10} =", dict(GEN_KWARGS)), "sums", i, 0) for i in range(n)
    ]


@pytest.fixture(scope="module")
def child(tiny_model):
    from flipcheck.compressors.noise import NoiseConfig, apply_noise

    m = copy.deepcopy(tiny_model)
    apply_noise(m, NoiseConfig(sigma=0.2, seed=0))
    return m.eval()


@pytest.fixture(scope="module")
def hf_parent(tiny_model, tiny_tokenizer, task_dir):
    return evaluate(hflm(tiny_model, tiny_tokenizer), task_dir)


@pytest.fixture(scope="module")
def flip_parent(tiny_model, tiny_tokenizer, task_dir):
    lm = FlipLM(tiny_model, tiny_tokenizer, batch_size=8, progress=False)
    return lm, evaluate(lm, task_dir)


@pytest.fixture(scope="module")
def lockstep(child, tiny_model, tiny_tokenizer, task_dir):
    lm = FlipLM(child, tiny_tokenizer, batch_size=8, reference=tiny_model, progress=False)
    return lm, evaluate(lm, task_dir)


def assert_same_samples(a, b, tol=1e-4):
    """Per-sample lm-eval results equal: options' log-likelihoods within tol, greedy flags, metrics, text."""
    for task in TASKS:
        assert len(a[task]) == len(b[task]) > 0
        for x, y in zip(a[task], b[task], strict=True):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
            if task == "tiny_sums":
                assert x["resps"] == y["resps"]
                assert x["exact_match"] == y["exact_match"]
                continue
            for (rx,), (ry,) in zip(x["resps"], y["resps"], strict=True):
                assert abs(float(rx[0]) - float(ry[0])) <= tol
                assert bool(rx[1]) == bool(ry[1])
            for metric in ("acc", "acc_norm"):
                if metric in x:
                    assert x[metric] == y[metric], (task, x["doc_id"], metric)


def hand_scores(parent, child, lm, ctx, cont):
    """Full-sequence forward of ctx+cont through both models: per-position log-probs, KL, top-1."""
    c_enc, o_enc = lm._encode_pair(ctx, cont)
    seq = torch.tensor([c_enc + o_enc])
    with torch.no_grad():
        lp = torch.log_softmax(parent(seq).logits[0].double(), -1)
        lq = torch.log_softmax(child(seq).logits[0].double(), -1)
    pos = torch.arange(len(c_enc) - 1, len(c_enc) + len(o_enc) - 1)
    lp, lq, tgt = lp[pos], lq[pos], torch.tensor(o_enc)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {
        "kl": kl.numpy(),
        "agree": (lp.argmax(-1) == lq.argmax(-1)).numpy(),
        "ll_p": float(lp[torch.arange(len(o_enc)), tgt].sum()),
        "ll_c": float(lq[torch.arange(len(o_enc)), tgt].sum()),
    }


# ---------------------------------------------------------------------------------------------------
# packing layout


def test_plan_rows_builds_a_prefix_tree_of_the_inputs():
    items = [
        ([1, 2, 3], [4, 5, 6]),  # input 1 2 3 4 5
        ([1, 2, 3], [4, 5, 9]),  # the same input: the same nodes
        ([1, 2, 3], [4, 7, 8]),  # shares 1 2 3 4, adds one node
        ([1, 2, 3], [9]),  # single token: read at the context's last node
        ([5, 6], [7]),  # nothing in common: its own plain row
        ([1, 2, 3, 4, 5, 6], [7, 8]),  # 8 > max_length + 1: HFLM's (ctx + cont)[-7:][:-1]
    ]
    rows = plan_rows(items, max_length=6, pack=True)
    assert [r.tokens for r in rows] == [[1, 2, 3, 4, 5, 7], [2, 3, 4, 5, 6, 7], [5, 6]]
    tree, truncated, short = rows
    assert tree.positions == [0, 1, 2, 3, 4, 4] and tree.parents == [-1, 0, 1, 2, 3, 3]
    assert dict(tree.items) == {0: [2, 3, 4], 1: [2, 3, 4], 2: [2, 3, 5], 3: [2]}
    assert truncated.parents is None and dict(truncated.items) == {5: [4, 5]}
    assert short.parents is None and dict(short.items) == {4: [1]}

    allow, pos = attention_allow(tree, 7)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 1, 0],  # token 7 sees its ancestors 1 2 3 4, not the sibling 5
            [0, 0, 0, 0, 0, 0, 1],  # padding sees itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allow, want)
    assert pos.tolist() == [0, 1, 2, 3, 4, 4, 0]
    windowed, _ = attention_allow(tree, 6, window=2)
    assert windowed[4].tolist() == [False, False, False, True, True, False]
    plain, plain_pos = attention_allow(short, 3)
    assert torch.equal(plain, torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool))
    assert plain_pos.tolist() == [0, 1, 0]


def test_plan_rows_limits_rows_and_merges_only_substantial_prefixes():
    opts = [([1, 2, 3], [4, 5, 6]), ([1, 2, 3], [7, 8, 6]), ([1, 2, 3], [9, 10, 6])]
    rows = plan_rows(opts, max_length=16, pack=True, row_tokens=7)
    assert [r.tokens for r in rows] == [[1, 2, 3, 4, 5, 7, 8], [1, 2, 3, 9, 10]]
    assert rows[1].parents is None
    # prompts sharing one token stay apart; prompts sharing most of themselves (few-shot) merge
    assert len(plan_rows([([1, 2, 3, 4, 5, 6], [7]), ([1, 9, 9, 9, 9, 9], [7])], 16, pack=True)) == 2
    merged = plan_rows([([1, 2, 3, 4, 5, 6], [7]), ([1, 2, 3, 4, 5, 8], [7])], 16, pack=True)
    assert len(merged) == 1 and dict(merged[0].items) == {0: [5], 1: [6]}


def test_plan_rows_without_packing_is_one_sequence_per_input():
    items = [([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 6]), ([1, 2, 3], [7])]
    rows = plan_rows(items, max_length=16, pack=False)
    by_tokens = {tuple(r.tokens): dict(r.items) for r in rows}
    assert by_tokens == {(1, 2, 3, 4): {0: [2, 3], 1: [2, 3]}, (1, 2, 3): {2: [2]}}
    with pytest.raises(FlipcheckError, match="max_length"):
        plan_rows([([1], [2, 3, 4])], max_length=2, pack=True)


# ---------------------------------------------------------------------------------------------------
# agreement with lm-eval's HF backend


def test_matches_hflm_per_sample(hf_parent, flip_parent):
    lm, samples = flip_parent
    assert lm._pack and lm._runner.hidden_ok, (
        "the fast path (packing, head at scored positions) must be in use"
    )
    assert_same_samples(hf_parent, samples, tol=1e-4)
    # the records hold what lm-eval received
    for s in samples["tiny_sentences"]:
        for j, ((ll, greedy),) in enumerate(s["resps"]):
            rec = lm.records[("tiny_sentences", s["doc_id"], j)]
            assert rec.ll == pytest.approx(float(ll), abs=1e-9) and rec.is_greedy == bool(greedy)
            assert rec.topk_logp.shape == (rec.n_tokens, lm.topk) and rec.topk_ids.dtype == np.int32
            assert rec.tail_ids.shape == (rec.n_tokens, lm.tail_samples) and lm.tail_samples > 0
            assert rec.n_tokens == len(rec.token_ids) > 1
    for s in samples["tiny_sums"]:
        rec = lm.records[("tiny_sums", s["doc_id"], 0)]
        assert rec.text == s["resps"][0][0] and rec.topk_logp.shape == (rec.n_tokens, lm.topk)


@pytest.mark.parametrize("variant", ["eager", "unpacked_full_logits"])
def test_other_paths_match_hflm_with_truncation(variant, tiny_model, tiny_tokenizer):
    """Eager attention (packed) and the fallback path (one sequence per request, full logits) agree with
    HFLM, including requests left-truncated to max_length."""
    max_length = 24  # the sentence requests (22 tokens) fit, the letter ones (29) are truncated
    reqs = ll_instances(3)
    want = hflm(tiny_model, tiny_tokenizer, max_length=max_length).loglikelihood(reqs, disable_tqdm=True)
    model = tiny_model
    if variant == "eager":
        model = copy.deepcopy(tiny_model)
        model.set_attn_implementation("eager")
    lm = FlipLM(model, tiny_tokenizer, batch_size=5, max_length=max_length, progress=False)
    lens = [sum(map(len, lm._encode_pair(*r.args))) for r in reqs]
    assert min(lens) <= max_length + 1 < max(lens), "the requests must mix fitting and truncated ones"
    if variant == "eager":
        assert lm._pack and lm._runner.hidden_ok
    else:
        lm._pack, lm._runner.hidden_ok = False, False
    got = lm.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(want, got, strict=True):
        assert abs(a - b) <= 1e-4 and ga == gb


def test_loglikelihood_rolling_matches_hflm(tiny_model, tiny_tokenizer):
    from conftest import corpus

    texts = [" ".join(corpus()[i : i + 3]) for i in (0, 7, 40)] + ["A"]
    reqs = [instance("loglikelihood_rolling", (t,), "ppl", i, 0) for i, t in enumerate(texts)]
    want = hflm(tiny_model, tiny_tokenizer, max_length=16).loglikelihood_rolling(reqs, disable_tqdm=True)
    lm = FlipLM(tiny_model, tiny_tokenizer, batch_size=3, max_length=16, progress=False)
    got = lm.loglikelihood_rolling(reqs)
    assert len(lm.tok_encode(texts[0])) > 32, "several windows per document"
    assert np.allclose(got, want, atol=1e-4, rtol=0)
    for i, t in enumerate(texts):
        rec = lm.records[("ppl", i, 0)]
        assert rec.n_tokens == len(lm.tok_encode(t)) and rec.ll == pytest.approx(got[i])


# ---------------------------------------------------------------------------------------------------
# lock-step KL


def test_lockstep_with_identical_child_has_zero_kl(tiny_model, tiny_tokenizer):
    twin = copy.deepcopy(tiny_model)
    lm = FlipLM(twin, tiny_tokenizer, batch_size=6, reference=tiny_model, progress=False)
    reqs = ll_instances(2)
    out = lm.loglikelihood(reqs)
    texts = lm.generate_until(gen_instances(3))
    assert len(texts) == 3
    per_doc: dict[tuple[str, int], int] = {}
    for key, rec in lm.records.items():
        ref = lm.reference_records[key]
        assert rec.kl is not None
        per_doc[key[:2]] = per_doc.get(key[:2], 0) + len(rec.kl)
        assert np.all(np.abs(rec.kl) <= 1e-6) and rec.top1_agree.all()
        if rec.kind == "loglikelihood":
            assert ref.ll == rec.ll and ref.is_greedy == rec.is_greedy
        else:
            assert ref.text == rec.text and np.array_equal(ref.token_ids, rec.token_ids)
    assert [o[0] for o in out] == [lm.records[(r.task_name, r.doc_id, r.idx)].ll for r in reqs]
    assert all(per_doc.values())


def test_lockstep_noisy_child_kl_equals_hand_computation(lockstep, tiny_model, child):
    lm, _ = lockstep
    assert lm._pack and lm._runner.hidden_ok and lm._ref_runner.hidden_ok
    from conftest import _docs

    docs = _docs(20, seed=2)
    means = []
    for task, doc_id, j in [("tiny_sentences", 0, 0), ("tiny_sentences", 3, 2), ("tiny_sentences", 7, 3)]:
        ctx = f"Question: What color is the {docs[doc_id]['animal']}?\nAnswer:"
        hand = hand_scores(tiny_model, child, lm, ctx, " " + docs[doc_id]["endings"][j])
        rec, ref = lm.records[(task, doc_id, j)], lm.reference_records[(task, doc_id, j)]
        assert rec.n_tokens == len(hand["kl"]) > 5
        # the positions an earlier option of the question scored (at least the first) are counted there
        owned = len(rec.kl)
        assert 0 < owned <= len(hand["kl"]) - (1 if j else 0)
        np.testing.assert_allclose(rec.kl, hand["kl"][-owned:], atol=1e-5, rtol=1e-4)
        assert np.array_equal(rec.top1_agree, hand["agree"][-owned:])
        assert rec.ll == pytest.approx(hand["ll_c"], abs=1e-4) and ref.ll == pytest.approx(
            hand["ll_p"], abs=1e-4
        )
        means.append(rec.kl.mean())
    assert min(means) > 1e-3, "sigma 0.2 noise must move the distribution"
    # generation: the child's KL runs along the parent's greedy output
    rec, ref = lm.records[("tiny_sums", 5, 0)], lm.reference_records[("tiny_sums", 5, 0)]
    assert len(rec.kl) == ref.n_tokens == len(ref.token_ids) > 0
    ctx_ids = lm.tok_encode("5 5 =")
    seq = torch.tensor([ctx_ids + ref.token_ids.tolist()])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(seq).logits[0].double(), -1)[len(ctx_ids) - 1 : -1]
        lq = torch.log_softmax(child(seq).logits[0].double(), -1)[len(ctx_ids) - 1 : -1]
    np.testing.assert_allclose(rec.kl, (lp.exp() * (lp - lq)).sum(-1).numpy(), atol=1e-5, rtol=1e-4)
    assert np.array_equal(ref.token_ids, lp.argmax(-1).numpy()), (
        "the parent's output is its own greedy choice"
    )


def test_replay_reproduces_reference_results(lockstep, hf_parent, flip_parent, task_dir):
    lm, child_samples = lockstep
    replayed = evaluate(ReplayLM(lm.reference_records), task_dir)
    assert_same_samples(hf_parent, replayed, tol=1e-4)
    assert_same_samples(flip_parent[1], replayed, tol=1e-6)
    # and the lock-step run returned the CHILD's answers, not the parent's
    diffs = [
        abs(float(x["resps"][0][0][0]) - float(y["resps"][0][0][0]))
        for x, y in zip(child_samples["tiny_sentences"], replayed["tiny_sentences"], strict=True)
    ]
    assert max(diffs) > 0.1


def test_replay_rejects_missing_and_stale_records():
    req = instance("loglikelihood", ("a", " b"), "t", 0, 0)
    with pytest.raises(FlipcheckError, match="no recorded loglikelihood"):
        ReplayLM({}).loglikelihood([req])
    stale = Record(kind="loglikelihood", args_hash=args_hash(("a", " c")), ll=-1.0, is_greedy=False)
    with pytest.raises(FlipcheckError, match="stale"):
        ReplayLM({("t", 0, 0): stale}).loglikelihood([req])
    wrong_kind = Record(kind="generate_until", args_hash=args_hash(req.args), text="x")
    with pytest.raises(FlipcheckError, match="generate_until result"):
        ReplayLM({("t", 0, 0): wrong_kind}).loglikelihood([req])
    good = Record(kind="loglikelihood", args_hash=args_hash(req.args), ll=-1.5, is_greedy=True)
    assert ReplayLM({("t", 0, 0): good}).loglikelihood([req]) == [(-1.5, True)]


# ---------------------------------------------------------------------------------------------------
# cached-parent KL (top-K approximation)


def test_kl_from_topk_is_the_tail_bucket_lower_bound():
    gen = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 40, 5
    lp = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2, -1)
    lq = torch.log_softmax(lp + 0.7 * torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    exact = kl_exact(lp, lq).double().numpy()
    assert np.allclose(exact, (lp.exp() * (lp - lq)).sum(-1).numpy(), atol=1e-6)
    top_v, top_i = torch.topk(lp, k, -1)
    approx = kl_from_topk(top_v.float().numpy(), top_i.int().numpy(), lq.float().numpy())
    # hand: head terms + one bucket for the rest; the gap is p_tail * KL of the renormalised tails
    head = (top_v.exp() * (top_v - lq.gather(-1, top_i))).sum(-1)
    tail_mask = torch.ones_like(lp, dtype=torch.bool).scatter(-1, top_i, False)
    p_tail = (lp.exp() * tail_mask).sum(-1)
    q_tail = (lq.exp() * tail_mask).sum(-1)
    hand = head + p_tail * torch.log(p_tail / q_tail)
    np.testing.assert_allclose(approx, hand.numpy(), atol=1e-5)
    pt = torch.where(tail_mask, lp - torch.log(p_tail)[:, None], -torch.inf)
    qt = torch.where(tail_mask, lq - torch.log(q_tail)[:, None], -torch.inf)
    gap = p_tail * torch.where(tail_mask, pt.exp() * (pt - qt), 0).sum(-1)
    np.testing.assert_allclose(exact - approx, gap.numpy(), atol=1e-5)
    assert np.all(approx <= exact + 1e-6) and np.all(gap.numpy() > 0)
    full_v, full_i = torch.topk(lp, vocab, -1)
    np.testing.assert_allclose(kl_from_topk(full_v.float(), full_i, lq.float()), exact, atol=1e-5)


def test_cached_reference_kl_bounds_the_exact_kl(tiny_model, tiny_tokenizer):
    """A random-init model is nearly uniform (top-64 of 384 tokens holds ~23 % of the mass); scaling its
    head by 20 gives the peaked distributions of a trained model (top-64 holds ~99.8 %)."""
    from flipcheck.compressors.noise import NoiseConfig, apply_noise

    parent_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        parent_model.lm_head.weight.mul_(20.0)
    child_model = copy.deepcopy(parent_model)
    apply_noise(child_model, NoiseConfig(sigma=0.2, seed=0))
    ll_reqs, gen_reqs = ll_instances(3), gen_instances(3)

    def run(model, **kw):
        lm = FlipLM(model, tiny_tokenizer, batch_size=8, progress=False, **kw)
        lm.loglikelihood(ll_reqs)
        lm.generate_until(gen_reqs)
        return lm

    exact = run(child_model, reference=parent_model).records
    vocab = tiny_model.config.vocab_size
    gaps = []
    for k in (64, vocab):
        parent = run(parent_model, topk=k, tail_samples=0)  # top-K only: the tail-bucket lower bound
        assert parent.records[("sums", 0, 0)].topk_logp.shape[1] == k
        cached = run(child_model, reference=parent.records).records
        for key, rec in exact.items():
            approx = cached[key]
            assert approx.ll == rec.ll and approx.text == rec.text
            assert approx.kl.shape == rec.kl.shape
            assert np.all(approx.kl <= rec.kl + 1e-6), key
            assert np.array_equal(approx.top1_agree, rec.top1_agree)
            if k == vocab:
                np.testing.assert_allclose(approx.kl, rec.kl, atol=1e-5, rtol=1e-5)
            else:
                gaps.append((rec.kl - approx.kl, rec.kl))
    gap, exact_kl = (np.concatenate(x) for x in zip(*gaps, strict=True))
    # measured: mean exact KL ~0.45 nats; mean gap ~0.55 % of it; per position at most ~3.3 % of the exact KL
    assert exact_kl.mean() > 0.1
    assert gap.mean() <= 0.02 * exact_kl.mean()
    assert np.all(gap <= 0.1 * exact_kl + 1e-4)


def test_cached_reference_rejects_missing_or_stale_records(child, tiny_model, tiny_tokenizer):
    reqs = ll_instances(1)
    parent = FlipLM(tiny_model, tiny_tokenizer, progress=False)
    parent.loglikelihood(reqs)
    records = dict(parent.records)
    lm = FlipLM(child, tiny_tokenizer, reference=records, progress=False)
    with pytest.raises(FlipcheckError, match="no loglikelihood record"):
        lm.loglikelihood(ll_instances(2))
    key = next(iter(records))
    records[key] = Record(**{**records[key].__dict__, "args_hash": "0" * 64})
    with pytest.raises(FlipcheckError, match="stale"):
        lm.loglikelihood(reqs)


# ---------------------------------------------------------------------------------------------------
# invariance and robustness


def test_batch_size_invariance(child, tiny_model, tiny_tokenizer):
    reqs = ll_instances(4)
    one = FlipLM(child, tiny_tokenizer, batch_size=1, reference=tiny_model, progress=False)
    many = FlipLM(child, tiny_tokenizer, batch_size=16, reference=tiny_model, progress=False)
    a, b = one.loglikelihood(reqs), many.loglikelihood(reqs)
    assert [g for _, g in a] == [g for _, g in b]
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-5, rtol=0)
    for key, rec in one.records.items():
        np.testing.assert_allclose(rec.kl, many.records[key].kl, atol=1e-5, rtol=0)
        assert one.reference_records[key].ll == pytest.approx(many.reference_records[key].ll, abs=1e-5)


def test_nonfinite_logits_are_counted_not_fatal(tiny_model, tiny_tokenizer):
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.lm_head.weight[7] = float("nan")
    reqs = ll_instances(1)
    lm = FlipLM(broken, tiny_tokenizer, reference=tiny_model, progress=False)
    out = lm.loglikelihood(reqs)
    assert all(ll == float("-inf") and greedy is False for ll, greedy in out)
    # every distinct scored position (a context's options share their first) counted once
    distinct = {t: sum(len(r.kl) for k, r in lm.records.items() if k[0] == t) for t in ("sent", "letters")}
    assert lm.nonfinite == distinct and all(distinct.values())
    rec = lm.records[("sent", 0, 0)]
    assert np.isnan(rec.kl).all() and not rec.top1_agree.any()
    assert lm.reference_records[("sent", 0, 0)].ll > float("-inf")
    assert not any(lm.reference_nonfinite.values())


def test_tokenizer_without_pad_token_generates_the_same(tiny_model, tiny_tokenizer):
    reqs = gen_instances(4)
    want = FlipLM(tiny_model, tiny_tokenizer, batch_size=4, progress=False).generate_until(reqs)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    got = FlipLM(tiny_model, tok, batch_size=4, progress=False).generate_until(reqs)
    assert got == want


def test_vocabulary_mismatch_is_refused(tiny_model, child, tiny_tokenizer):
    from conftest import corpus
    from flipcheck.tiny import build_llama, build_tokenizer

    other_tok = build_tokenizer(corpus(), vocab_size=300)
    with pytest.raises(FlipcheckError, match="KL is meaningless across different vocabularies"):
        FlipLM(child, tiny_tokenizer, reference=tiny_model, reference_tokenizer=other_tok, progress=False)
    wider = build_llama(len(tiny_tokenizer) + 16)
    with pytest.raises(FlipcheckError, match="KL is meaningless across different vocabularies"):
        FlipLM(child, tiny_tokenizer, reference=wider, progress=False)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"topk": 0}, "topk"),
        ({"max_gen_toks": 0}, "max_gen_toks"),
        ({"max_length": 1}, "max_length"),
        ({"reference": "parent"}, "reference"),
    ],
)
def test_bad_settings_fail_early(kwargs, setting, tiny_model, tiny_tokenizer):
    with pytest.raises(FlipcheckError, match=setting):
        FlipLM(tiny_model, tiny_tokenizer, progress=False, **kwargs)


def test_generation_longer_than_max_length_is_refused(tiny_model, tiny_tokenizer):
    lm = FlipLM(tiny_model, tiny_tokenizer, max_length=8, progress=False)
    with pytest.raises(FlipcheckError, match="max_gen_toks"):
        lm.generate_until(gen_instances(1))


@pytest.mark.parametrize("model_type, window", [("mistral", 6), ("qwen2", None)])
def test_other_llama_family_models_match_hflm(model_type, window, tiny_tokenizer):
    """Mistral with a sliding window shorter than the inputs (the packed mask must apply it) and
    Qwen2 (biased projections) agree with HFLM."""
    from flipcheck.tiny import build_llama

    model = build_llama(len(tiny_tokenizer), model_type=model_type, seed=1)
    if window is not None:
        model.config.sliding_window = window
    reqs = ll_instances(2)
    want = hflm(model, tiny_tokenizer).loglikelihood(reqs, disable_tqdm=True)
    lm = FlipLM(model, tiny_tokenizer, batch_size=4, progress=False)
    assert lm._pack and lm._runner.hidden_ok and lm._window == window
    got = lm.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(want, got, strict=True):
        assert abs(a - b) <= 1e-4 and ga == gb


def test_packing_probe_and_empty_requests(tiny_tokenizer):
    from flipcheck.evaluation.forward import ModelRunner
    from flipcheck.tiny import build_llama

    # a vocabulary small enough that the probe's second continuation sorts first
    assert ModelRunner(build_llama(40)).pack_ok
    lm = FlipLM(build_llama(len(tiny_tokenizer)), tiny_tokenizer, progress=False)
    assert lm.loglikelihood([]) == [] and lm.generate_until([]) == [] and lm.loglikelihood_rolling([]) == []


def test_each_scored_position_is_counted_once(child, tiny_model, tiny_tokenizer):
    """The options of a question are all predicted at the context's last position (and options sharing
    leading tokens share the next positions too): each distinct position's KL is counted once."""
    reqs = ll_instances(2)
    lm = FlipLM(child, tiny_tokenizer, reference=tiny_model, progress=False)
    lm.loglikelihood(reqs)
    for d in range(2):
        letters = [r for r in reqs if r.task_name == "letters" and r.doc_id == d]
        recs = [lm.records[(r.task_name, d, r.idx)] for r in letters]
        conts = [lm._encode_pair(*r.args)[1] for r in letters]
        distinct = {tuple(c[:j]) for c in conts for j in range(len(c))}
        # MMLU-style: the letters' tokens share their prefixes (here " " then the letter), so the
        # whole question has len(distinct) positions, all scored first by option A, not 4x as many
        assert [len(r.kl) for r in recs] == [len(distinct), 0, 0, 0] and len(distinct) < sum(map(len, conts))
        ctx, _ = lm._encode_pair(*letters[0].args)
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(torch.tensor([ctx])).logits[0, -1].double(), -1)
            lq = torch.log_softmax(child(torch.tensor([ctx])).logits[0, -1].double(), -1)
        assert recs[0].kl[0] == pytest.approx(float((lp.exp() * (lp - lq)).sum()), abs=1e-5)
        sents = [r for r in reqs if r.task_name == "sent" and r.doc_id == d]
        conts = [lm._encode_pair(*r.args)[1] for r in sents]
        distinct = {tuple(c[:j]) for c in conts for j in range(len(c))}  # the prefix each prediction reads
        assert len(distinct) < sum(map(len, conts))
        assert sum(len(lm.records[("sent", d, r.idx)].kl) for r in sents) == len(distinct)


def test_sampled_tail_brings_the_cached_kl_to_the_exact_kl(child, tiny_model, tiny_tokenizer):
    """The random-init parent is nearly uniform: its top-64 of 384 tokens holds ~23 % of the mass, so the
    tail-bucket bound is far below the exact KL; S tokens sampled from the tail (stored with the parent's
    records) estimate the rest: unbiased on average, so a single token may fall below the bound."""
    reqs = ll_instances(3)

    def run(model, **kw):
        lm = FlipLM(model, tiny_tokenizer, batch_size=8, progress=False, **kw)
        lm.loglikelihood(reqs)
        return lm.records

    exact = np.concatenate([r.kl for r in run(child, reference=tiny_model).values()])
    sampled = run(tiny_model, topk=64, tail_samples=256)
    assert next(iter(sampled.values())).tail_ids.shape[1] == 256
    bound = np.concatenate([r.kl for r in run(child, reference=run(tiny_model, topk=64, tail_samples=0)).values()])
    est = np.concatenate([r.kl for r in run(child, reference=sampled).values()])
    assert np.any(est < bound)  # per token, an unclamped estimate (clamping biased the mean up)
    gap_bound = (exact.mean() - bound.mean()) / exact.mean()
    gap_est = abs(est.mean() - exact.mean()) / exact.mean()
    # measured on these few positions: the bound misses 80 %, the unbiased estimate 14 % (its noise on a
    # flat distribution; over ~900 corpus tokens it comes within 0.2-2 %, see test_corpus)
    assert gap_bound > 0.5 and gap_est < 0.25
