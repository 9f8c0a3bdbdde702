"""KL method records and scored-position keys (pure functions)."""

from __future__ import annotations

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.kl import kl_method
from flipcheck.evaluation.packing import position_keys


def test_kl_method_names_and_labels():
    assert kl_method("topk", 1024, 0) == {"name": "topk_bound", "k": 1024, "label": "top-K + tail lower bound, K=1024"}
    assert kl_method("topk", 256, 128)["label"] == "top-K + sampled tail, K=256, S=128 (unbiased estimate of the mean)"
    assert kl_method("exact", 64) == {"name": "exact", "label": "exact (parent in lock-step)"}
    with pytest.raises(FlipcheckError, match="kl='approx': allowed are topk, exact"):
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
