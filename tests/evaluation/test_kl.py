"""KL method records and scored-position keys (pure functions)."""

from __future__ import annotations

import pytest
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.kl import kl_method
from flipcheck.evaluation.packing import position_keys


def test_kl_method_names_and_labels():
    assert kl_method("topk", 1024, 0) == {"name": "topk_bound", "k": 1024, "label": "top-K + tail lower bound, K=1024"}
    assert kl_method("topk", 256, 128)["label"] == "top-K + sampled tail, K=256, S=128 (unbiased estimate of the mean)"
    assert kl_method("exact", 64) == {"name": "exact", "label": "exact (parent in lock-step)"}
    assert kl_method("bound", 256) == {"name": "topk_bound", "k": 256, "label": "top-K + tail lower bound, K=256"}
    with pytest.raises(FlipcheckError, match="kl='approx': allowed are topk, bound, exact"):
        kl_method("approx", 64)


def test_position_keys_identify_the_prefix_each_prediction_reads():
    ctx = [1, 2, 3]
    a, b, c = position_keys(ctx, [7, 8, 9], 16), position_keys(ctx, [7, 8, 5], 16), position_keys(ctx, [4], 16)
    # every option's first token is read at the context's last position; " 7 8" is shared by a and b
    assert a[0] == b[0] == c[0] and a[1] == b[1] and a[2] == b[2]
    assert len({*a, *b, *c}) == 3  # 3 + 3 + 1 predictions, 3 distinct positions
    assert position_keys([9, 2, 3], [7], 16)[0] != a[0]  # another context: another position
    # left truncation to max_length: a long input's first prediction reads another (shorter) prefix
    assert position_keys(ctx, [7, 8, 9], 3)[0] != a[0]


def test_kl_exact_both_equals_two_kl_exact_calls_and_handles_zero_probabilities():
    import torch

    from flipcheck.evaluation.kl import kl_exact, kl_exact_both

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 50, generator=g) * 3, -1)
    lq = torch.log_softmax(torch.randn(6, 50, generator=g) * 3, -1)
    lp[0, :10] = float("-inf")  # a masked token: p = 0 there, 0 * -inf must not turn the row NaN
    lp[0] = torch.log_softmax(lp[0], -1)
    want = (kl_exact(lp, lq), kl_exact(lq, lp))
    got = kl_exact_both(lp.clone(), lq.clone())
    assert torch.isfinite(got[0]).all()  # KL(P||C): P's zero-probability tokens add nothing
    assert got[1][0] == float("inf") and torch.isfinite(got[1][1:]).all()  # KL(C||P): C has mass where P has none
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bucket_bound_is_a_lower_bound_that_tightens_to_the_exact_kl():
    """The served-model bound (S = parent's top-K & child's top-k, the rest one bucket) never exceeds the
    exact KL in either direction, equals the plain top-K bound when the child gives everything, and the
    exact KL when both give everything."""
    from flipcheck.evaluation.kl import kl_bucket_bound, kl_exact, kl_topk_tensors

    g = torch.Generator().manual_seed(0)
    V = 60
    lp = torch.log_softmax(torch.randn(200, V, generator=g) * 2, -1)
    lq = torch.log_softmax(lp + torch.randn(200, V, generator=g) * 0.7, -1)
    exact_f, exact_r = kl_exact(lp, lq), kl_exact(lq, lp)
    top_v, top_i = lp.topk(12, dim=-1)
    prev = torch.zeros(200)
    for child_k in (3, 12, 30, V):
        fwd, rev = kl_bucket_bound(top_v, top_i, lq, child_k)
        assert bool((fwd <= exact_f + 1e-5).all()) and bool((rev <= exact_r + 1e-5).all())
        assert float(fwd.mean()) >= float(prev.mean()) - 1e-6  # more known tokens: a tighter bound
        prev = fwd
    assert torch.allclose(kl_bucket_bound(top_v, top_i, lq, V)[0], kl_topk_tensors(top_v, top_i, lq), atol=1e-6)
    all_v, all_i = lp.topk(V, dim=-1)
    fwd, rev = kl_bucket_bound(all_v, all_i, lq, V)
    assert torch.allclose(fwd, exact_f, atol=1e-5) and torch.allclose(rev, exact_r, atol=1e-5)


def test_served_rows_keep_listed_log_probs_and_stay_distributions():
    """A served model's row: listed entries exact, the rest spread evenly below the smallest listed one,
    the row sums to 1, and a token id outside the parent's vocabulary is refused."""
    from flipcheck.errors import FlipcheckError
    from flipcheck.evaluation.engines.served import ServedEngine

    eng = ServedEngine("http://127.0.0.1:9", "m", topk=3)  # nothing is contacted to build rows
    eng.bind(40)
    row = torch.from_numpy(eng._dense({3: -0.4, 7: -1.9, 11: -2.6}))
    assert row[3].item() == pytest.approx(-0.4) and row[11].item() == pytest.approx(-2.6)
    assert abs(torch.logsumexp(row, 0).item()) < 1e-5
    rest = row[[i for i in range(40) if i not in (3, 7, 11)]]
    assert torch.allclose(rest, rest[0]) and rest[0].item() < -2.6
    assert set(row.topk(3).indices.tolist()) == {3, 7, 11}
    with pytest.raises(FlipcheckError, match="outside the parent's vocabulary"):
        eng._dense({45: -0.1})
