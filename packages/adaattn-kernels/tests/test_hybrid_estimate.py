"""Sampled error estimator and cheap predictor of hybrid plans (plain CPU)."""

from __future__ import annotations

import pytest
import torch
from adaattn_kernels import attention_reference
from adaattn_kernels.hybrid import (
    HybridPlan,
    estimate_hybrid_error,
    exact_attention_rows,
    hybrid_attention_reference,
    predict_hybrid_error,
    sample_query_rows,
)
from adaattn_kernels.hybrid import estimate as estimate_module
from adaattn_kernels.hybrid.estimate import _exact_scores, _implied_weights, _softmax_rows
from adaattn_kernels.hybrid.naive import _expand_kv
from hypothesis import example, given, settings
from hypothesis import strategies as st


def _heads(b, hq, hkv, s, d, seed, temps):
    """Random heads whose query norm (inverse temperature) varies per head: diffuse to peaked."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(temps, dtype=torch.float64)[None, :, None, None]
    q = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64) * t
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    return q, k, v


def _true_error(q, k, v, plan, causal):
    out = hybrid_attention_reference(q, k, v, plan, causal=causal)
    ref = attention_reference(q, k, v, causal=causal)
    return ((out - ref).square().sum((-1, -2)) / ref.square().sum((-1, -2))).sqrt()


@settings(max_examples=25, deadline=None)
@given(sq=st.integers(1, 500), m=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
@example(sq=122, m=44, seed=0)  # 22 · (122/44) rounds above 61 in floating point
def test_sample_rows_stratified(sq, m, seed):
    rows = sample_query_rows(sq, m, generator=torch.Generator().manual_seed(seed))
    assert rows.numel() == min(m, sq)
    assert bool((rows[1:] > rows[:-1]).all())  # sorted and distinct
    assert int(rows.min()) >= 0
    assert int(rows.max()) < sq
    if m < sq:  # one row per stratum [ceil(i·sq/m), ceil((i+1)·sq/m))
        i = torch.arange(m, dtype=torch.int64)
        assert bool((rows >= -(-i * sq // m)).all())
        assert bool((rows < -(-(i + 1) * sq // m)).all())


def test_sample_rows_errors():
    with pytest.raises(ValueError, match="num_samples"):
        sample_query_rows(10, 0)


def test_exact_attention_rows_matches_full():
    q, k, v = _heads(1, 4, 2, 50, 8, seed=0, temps=[1, 1, 1, 1])
    rows = torch.tensor([0, 7, 49])
    for causal in (False, True):
        full = attention_reference(q, k, v, causal=causal)
        torch.testing.assert_close(
            exact_attention_rows(q, k, v, rows, causal=causal), full[:, :, rows]
        )


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_with_all_rows_is_the_true_error(causal):
    q, k, v = _heads(1, 4, 2, 96, 16, seed=1, temps=[0.2, 0.5, 1.0, 2.0])
    plan = HybridPlan.build(1, 4, seq_len_k=96, window=torch.tensor([8, 16, 4, 8]), rank=12,
                            sinks=2, exact=torch.tensor([False, False, False, True]))  # fmt: skip
    est = estimate_hybrid_error(q, k, v, plan, causal=causal, num_samples=96)
    true = _true_error(q, k, v, plan, causal)
    torch.testing.assert_close(est.double(), true, rtol=1e-5, atol=1e-7)
    assert float(est[0, 3]) == 0.0  # exact head
    assert float(est[0, 2]) > 1e-3  # a genuinely approximate head


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_within_2x_on_random_heads(causal):
    """The acceptance criterion on synthetic heads: estimate ≥ true / 2 on ≥ 95% of heads."""
    temps = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
    q, k, v = _heads(2, 8, 4, 384, 16, seed=2, temps=temps)
    plan = HybridPlan.uniform(2, 8, seq_len_k=384, window=32, rank=24, sinks=4)
    est = estimate_hybrid_error(
        q, k, v, plan, causal=causal, num_samples=32, generator=torch.Generator().manual_seed(3)
    ).double()
    true = _true_error(q, k, v, plan, causal)
    ok = (est >= true / 2) & (est <= 2 * true)
    assert float(ok.double().mean()) >= 0.95, (est, true)


def test_estimate_errors():
    q, k, v = _heads(1, 2, 2, 16, 8, seed=4, temps=[1, 1])
    plan = HybridPlan.uniform(1, 2, seq_len_k=16, window=4, rank=4)
    with pytest.raises(ValueError, match="num_samples"):
        estimate_hybrid_error(q, k, v, plan, num_samples=0)
    bad = q.clone()
    bad[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        estimate_hybrid_error(bad, k, v, plan)
    with pytest.raises(ValueError, match="plan"):
        estimate_hybrid_error(q, k, v, HybridPlan.exact(1, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_implied_distribution_reproduces_hybrid_output(causal):
    """Identity behind the predictor: hybrid output = attention with the implied p̃."""
    q, k, v = _heads(1, 3, 1, 60, 8, seed=5, temps=[0.5, 1.0, 2.0])
    plan = HybridPlan.build(
        1, 3, seq_len_k=60, window=torch.tensor([5, 9, 13]), rank=torch.tensor([6, 10, 20]),
        sinks=torch.tensor([0, 2, 7]),
    )  # fmt: skip
    mode = 2 if causal else 0
    rows = torch.arange(60)
    s = _exact_scores(q, rows, k, mode, 8**-0.5, 60)
    p_tilde, _ = _implied_weights(_softmax_rows(s), s, plan, rows, 60, mode)
    got = torch.matmul(p_tilde, _expand_kv(v, 3))
    want = hybrid_attention_reference(q, k, v, plan, causal=causal)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _predict_per_candidate(q, k, v, windows, ranks, sinks, causal, m, seed, scale=None):
    """The predictor's definition evaluated one (w, r) at a time from the implied p̃."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    mode = {False: 0, "top_left": 1, "bottom_right": 2}[causal]
    rows = sample_query_rows(sq, m, generator=torch.Generator().manual_seed(seed))
    s = _exact_scores(q[:, :, rows], rows, k, mode, d**-0.5 if scale is None else scale, sq)
    p = _softmax_rows(s)
    vq = _expand_kv(v, hq)
    out_sq = torch.matmul(p, vq).square().sum((-1, -2)).clamp_min(1e-300)  # no allowed key: 0
    sigma_v2 = (vq - vq.mean(2, keepdim=True)).square().sum(-1).mean(-1)
    err = torch.empty(b, hq, len(windows), len(ranks), dtype=torch.float64)
    far = torch.empty_like(err)
    for a, w in enumerate(windows):
        for c, r in enumerate(ranks):
            plan = HybridPlan.uniform(b, hq, seq_len_k=sk, window=w, rank=r, sinks=sinks)
            p_tilde, pooled = _implied_weights(p, s, plan, rows, sq, mode)
            delta2 = (p_tilde - p).square().sum((-1, -2))
            err[:, :, a, c] = (delta2 * sigma_v2 / out_sq).sqrt()
            far[:, :, a, c] = (p * pooled).sum(-1).mean(-1)
    return err, far


@settings(max_examples=30, deadline=None)
@given(
    sq=st.integers(1, 90),
    sk=st.integers(1, 90),
    causal=st.sampled_from([False, "top_left", "bottom_right"]),
    sinks=st.integers(0, 6),
    temp=st.sampled_from([0.2, 1.0, 4.0, 32.0]),
    chunked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(sq=64, sk=64, causal="top_left", sinks=0, temp=32.0, chunked=False, seed=0)
def test_grid_predictor_equals_per_candidate_definition(sq, sk, causal, sinks, temp, chunked, seed):
    """All windows of a rank at once (per-segment sums) = p̃ built candidate by candidate.

    Temperatures up to 32 put the row's peak in a pooled segment (``c ≫ 1``), where a
    prefix-sum formulation loses all digits; float32 output, so agreement to ~1e-6 relative.
    """
    q, k, v = _heads(2, 4, 2, max(sq, sk), 8, seed, temps=[temp] * 4)
    q, k, v = q[:, :, :sq], k[:, :, :sk], v[:, :, :sk]
    windows, ranks = [1, 3, 10, 40, 100], [1, 2, 7, 16, 90]
    want_err, want_far = _predict_per_candidate(q, k, v, windows, ranks, sinks, causal, 24, 3)
    with pytest.MonkeyPatch.context() as mp:
        if chunked:  # one window per chunk: the memory-bounded path
            mp.setattr(estimate_module, "_MAX_GRID_ELEMENTS", 1)
        pred = predict_hybrid_error(
            q, k, v, windows=windows, ranks=ranks, sinks=sinks, causal=causal, num_samples=24,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
    torch.testing.assert_close(pred.error.double(), want_err, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pred.far_mass.double(), want_far, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("gap", [50.0, 400.0, 700.0])
def test_grid_predictor_on_a_spike_far_from_the_window(gap):
    """One key ``gap`` logits above the rest, pooled: ``c`` up to ~e^700, still exact, no NaN."""
    g = torch.Generator().manual_seed(11)
    q = torch.ones(1, 1, 8, 1, dtype=torch.float64)
    k = torch.zeros(1, 1, 64, 1, dtype=torch.float64)
    k[0, 0, 0] = gap
    v = torch.randn(1, 1, 64, 1, dtype=torch.float64, generator=g)
    k = k + 1e-3 * torch.randn(1, 1, 64, 1, dtype=torch.float64, generator=g)
    want, _ = _predict_per_candidate(q, k, v, [4], [4, 16], 0, False, 8, 3, scale=1.0)
    pred = predict_hybrid_error(
        q, k, v, windows=[4], ranks=[4, 16], causal=False, num_samples=8, scale=1.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert bool(torch.isfinite(pred.error).all())
    torch.testing.assert_close(pred.error.double(), want, rtol=1e-6, atol=0)


def test_predictor_exact_limits_and_ordering():
    q, k, v = _heads(1, 4, 2, 128, 16, seed=6, temps=[0.1, 0.3, 1.0, 2.0])
    pred = predict_hybrid_error(
        q, k, v, windows=[4, 32, 128], ranks=[8, 32, 128], causal=True, num_samples=128
    )
    assert pred.error.shape == (1, 4, 3, 3)
    # rank = Sk (segment 1) or window = Sk: no approximation at all
    assert float(pred.error[..., :, 2].abs().max()) < 1e-6
    assert float(pred.error[..., 2, :].abs().max()) < 1e-6
    # sharper heads (larger query norm) are harder to pool
    e = pred.error[0, :, 0, 0]
    assert bool((e[1:] > e[:-1]).all()), e
    assert bool((pred.entropy[0, 1:] < pred.entropy[0, :-1]).all())
    ok, w, r = pred.best(budget=float(e[0]) * 1.01)
    assert bool(ok[0, 0])
    assert int(w[0, 0]) == 4
    assert int(r[0, 0]) == 8


def test_predictor_tracks_true_error_for_random_values():
    """For values independent of the scores the predictor's model holds: within 2× of truth."""
    q, k, v = _heads(1, 6, 3, 256, 16, seed=7, temps=[0.1, 0.2, 0.4, 0.7, 1.0, 1.5])
    pred = predict_hybrid_error(
        q, k, v, windows=[16], ranks=[16], sinks=2, causal=False, num_samples=64,
        generator=torch.Generator().manual_seed(8),
    )  # fmt: skip
    plan = HybridPlan.uniform(1, 6, seq_len_k=256, window=16, rank=16, sinks=2)
    true = _true_error(q, k, v, plan, False)
    ratio = pred.error[..., 0, 0].double() / true
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio


def test_predictor_errors():
    q, k, v = _heads(1, 2, 2, 16, 8, seed=9, temps=[1, 1])
    with pytest.raises(ValueError, match="windows"):
        predict_hybrid_error(q, k, v, windows=[], ranks=[4])
    with pytest.raises(ValueError, match="ranks"):
        predict_hybrid_error(q, k, v, windows=[4], ranks=[0])
    with pytest.raises(ValueError, match="sinks"):
        predict_hybrid_error(q, k, v, windows=[4], ranks=[4], sinks=-1)
