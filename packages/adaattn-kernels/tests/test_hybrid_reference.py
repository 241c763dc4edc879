"""The hybrid-attention plan, decomposition and PyTorch reference (plain CPU, no Triton)."""

from __future__ import annotations

import pytest
import torch
from adaattn_kernels import attention_reference
from adaattn_kernels.hybrid import (
    HybridPlan,
    build_far_field,
    hybrid_attention,
    hybrid_attention_reference,
    hybrid_key_coverage,
    pooled_far_field_reference,
    segment_size_for_rank,
)
from hypothesis import given, settings
from hypothesis import strategies as st

CAUSALS = [False, True, "top_left"]


def _allowed(sq: int, sk: int, causal) -> torch.Tensor:
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    if causal is False:
        return torch.ones(sq, sk, dtype=torch.long)
    off = sk - sq if causal in (True, "bottom_right") else 0
    return (j <= i + off).long()


def _inputs(b, hq, hkv, sq, sk, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Plan construction and validation.
# ---------------------------------------------------------------------------------------------


def test_segment_size_for_rank():
    assert segment_size_for_rank(100, 10) == 10
    assert segment_size_for_rank(101, 10) == 11
    assert segment_size_for_rank(5, 10) == 1
    with pytest.raises(ValueError, match="rank"):
        segment_size_for_rank(100, 0)
    with pytest.raises(ValueError, match="seq_len_k"):
        segment_size_for_rank(0, 4)


def test_plan_build_broadcast_and_exact():
    plan = HybridPlan.build(
        2, 3, seq_len_k=100, window=torch.tensor([8, 16, 32]), rank=10, sinks=4,
        exact=torch.tensor([[False, True, False], [False, False, False]]),
    )  # fmt: skip
    assert plan.shape == (2, 3)
    assert plan.window.dtype == torch.int32
    assert plan.segment.tolist() == [[10, 0, 10], [10, 10, 10]]
    assert plan.window.tolist() == [[8, 16, 32], [8, 16, 32]]
    assert plan.is_exact.tolist() == [[False, True, False], [False, False, False]]
    assert plan.min_segment == 10
    assert plan.num_exact == 1
    assert plan.kind == 2
    assert plan.head_order.tolist() == [1, 0, 2, 3, 4, 5]  # exact heads launch first
    assert HybridPlan.exact(2, 2).kind == 0
    assert HybridPlan.uniform(2, 2, seq_len_k=8, window=2, rank=2).kind == 1
    assert plan.max_segments(100) == 10
    assert HybridPlan.exact(1, 2).max_segments(100) == 0
    assert plan.num_segments(95).tolist() == [[10, 0, 10], [10, 10, 10]]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(window=0, rank=4), ValueError, "window"),
        (dict(window=4, rank=0), ValueError, "rank"),
        (dict(window=4, rank=4, sinks=-1), ValueError, "sinks"),
        (dict(window=4.0, rank=4), TypeError, "window"),
        (dict(window=torch.ones(3, dtype=torch.int32), rank=4), ValueError, "broadcast"),
        (dict(window=4, rank=4, exact=torch.ones(2, 2)), TypeError, "exact"),
    ],
)
def test_plan_build_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HybridPlan.build(2, 2, seq_len_k=64, **kwargs)


def test_plan_direct_errors():
    z = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        HybridPlan(z.long(), z, z)
    with pytest.raises(ValueError, match="shape"):
        HybridPlan(z, z[:1], z)
    with pytest.raises(ValueError, match="segment"):
        HybridPlan(z + 1, z, z - 1)
    # window is ignored (may be 0) on exact heads only
    HybridPlan(z, z, z)
    with pytest.raises(ValueError, match="window"):
        HybridPlan(z, z, z + 2)


# ---------------------------------------------------------------------------------------------
# Decomposition: every allowed key enters each query's softmax exactly once.
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    window=st.integers(1, 45),
    sinks=st.integers(0, 12),
    seg=st.integers(1, 17),
    causal=st.sampled_from([False, True, "top_left"]),
)
def test_coverage_every_allowed_key_once(sq, sk, window, sinks, seg, causal):
    t = lambda x: torch.tensor([[x, 3]], dtype=torch.int32)
    plan = HybridPlan(t(window), t(sinks), torch.tensor([[seg, 0]], dtype=torch.int32))
    cov = hybrid_key_coverage(plan, seq_q=sq, seq_k=sk, causal=causal)
    expected = _allowed(sq, sk, causal).expand_as(cov)
    assert torch.equal(cov, expected)


# ---------------------------------------------------------------------------------------------
# Reference exactness limits (float64: agreement to ~1e-15 is rounding only; 1e-12 leaves room).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", CAUSALS)
@pytest.mark.parametrize(("sq", "sk"), [(33, 33), (20, 47), (47, 20)])
def test_reference_exact_limits(causal, sq, sk):
    q, k, v = _inputs(2, 4, 2, sq, sk, 16, seed=sq * 100 + sk)
    ref, lse_ref = attention_reference(q, k, v, causal=causal, return_lse=True)
    plans = [
        # segment size 1: every far key is its own pooled key (log 1 = 0)
        HybridPlan.build(2, 4, seq_len_k=sk, window=3, rank=sk, sinks=2),
        # window covers every key: no far field at all
        HybridPlan.build(2, 4, seq_len_k=sk, window=sk, rank=3, sinks=0),
        HybridPlan.exact(2, 4),
    ]
    for plan in plans:
        out, lse = hybrid_attention_reference(q, k, v, plan, causal=causal, return_lse=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        fin = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin], lse_ref[fin], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", CAUSALS)
def test_reference_exact_for_piecewise_constant_segments(causal):
    """Keys and values constant inside each segment: pooling loses nothing for any g, w, s.

    This checks the log-multiplicity correction: without ``+ log n_t`` a pooled key would carry
    the mass of one key instead of its segment's ``n_t`` keys, an O(1) error.
    """
    sq, sk, g = 45, 45, 4
    q, k, v = _inputs(1, 2, 1, sq, sk, 8, seed=7)
    seg = torch.arange(sk) // g
    k = k[:, :, seg * g]  # key j := key of its segment's first position
    v = v[:, :, seg * g]
    plan = HybridPlan(
        torch.tensor([[5, 9]], dtype=torch.int32),
        torch.tensor([[1, 0]], dtype=torch.int32),
        torch.tensor([[g, g]], dtype=torch.int32),
    )
    out = hybrid_attention_reference(q, k, v, plan, causal=causal)
    ref = attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_reference_is_an_approximation_for_generic_inputs():
    """A coarse plan on random (non-diffuse) inputs really differs from exact attention."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, seed=3)
    plan = HybridPlan.uniform(1, 2, seq_len_k=64, window=4, rank=4)
    out = hybrid_attention_reference(q, k, v, plan)
    ref = attention_reference(q, k, v)
    assert float((out - ref).norm() / ref.norm()) > 0.05


def test_reference_gqa_matches_repeated_heads():
    q, k, v = _inputs(1, 6, 2, 30, 30, 8, seed=11)
    plan = HybridPlan.build(
        1, 6, seq_len_k=30, window=torch.tensor([3, 5, 7, 2, 4, 6]), rank=5, sinks=1
    )
    out = hybrid_attention_reference(q, k, v, plan, causal=True)
    rep = hybrid_attention_reference(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), plan, causal=True
    )
    torch.testing.assert_close(out, rep, rtol=0, atol=1e-12)


def test_reference_fully_masked_rows_are_zero():
    # bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key.
    q, k, v = _inputs(1, 2, 2, 12, 5, 8, seed=5)
    plan = HybridPlan.uniform(1, 2, seq_len_k=5, window=2, rank=2)
    out, lse = hybrid_attention_reference(q, k, v, plan, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    assert bool(torch.isneginf(lse[:, :, :7]).all())
    assert bool(torch.isfinite(out).all())


def test_reference_lower_precision_inputs_use_fp32_math():
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, seed=9, dtype=torch.float32)
    plan = HybridPlan.uniform(1, 2, seq_len_k=40, window=8, rank=8, sinks=2)
    out16 = hybrid_attention_reference(q.half(), k.half(), v.half(), plan)
    out64 = hybrid_attention_reference(
        q.half().double(), k.half().double(), v.half().double(), plan
    )
    assert out16.dtype == torch.float16
    # fp32 math on fp16-rounded inputs: only the fp16 output rounding (2^-11 relative) remains.
    torch.testing.assert_close(out16.double(), out64, rtol=2e-3, atol=2e-3)


def test_reference_backward_flows():
    q, k, v = _inputs(1, 2, 1, 20, 20, 8, seed=2)
    q.requires_grad_()
    v.requires_grad_()
    plan = HybridPlan.uniform(1, 2, seq_len_k=20, window=4, rank=5)
    hybrid_attention_reference(q, k, v, plan, causal=True).sum().backward()
    assert q.grad is not None
    assert bool(torch.isfinite(q.grad).all())
    assert v.grad is not None
    assert float(v.grad.abs().sum()) > 0


def test_pooled_far_field_reference_segment_means():
    _, k, v = _inputs(1, 2, 1, 1, 10, 4, seed=4)
    plan = HybridPlan(
        torch.tensor([[2, 2]], dtype=torch.int32),
        torch.zeros(1, 2, dtype=torch.int32),
        torch.tensor([[3, 0]], dtype=torch.int32),
    )
    kp, vp = pooled_far_field_reference(k, v, plan, heads_q=2)
    assert kp.shape == (1, 2, 4, 4)
    torch.testing.assert_close(kp[0, 0, 0], k[0, 0, 0:3].mean(0))
    torch.testing.assert_close(vp[0, 0, 3], v[0, 0, 9:10].mean(0))  # short last segment
    assert torch.equal(kp[0, 1], torch.zeros_like(kp[0, 1]))  # exact head: nothing pooled
    kp2, vp2 = build_far_field(k, v, plan, backend="reference")
    torch.testing.assert_close(kp2, kp)
    torch.testing.assert_close(vp2, vp)


# ---------------------------------------------------------------------------------------------
# Public API: dispatch and argument errors.
# ---------------------------------------------------------------------------------------------


def test_api_auto_on_cpu_uses_reference():
    q, k, v = _inputs(1, 2, 2, 16, 16, 8, seed=1)
    plan = HybridPlan.uniform(1, 2, seq_len_k=16, window=4, rank=4)
    out = hybrid_attention(q, k, v, plan, causal=True)
    ref = hybrid_attention_reference(q, k, v, plan, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_api_errors():
    q, k, v = _inputs(1, 2, 2, 16, 16, 8, seed=1)
    plan = HybridPlan.uniform(1, 2, seq_len_k=16, window=4, rank=4)
    with pytest.raises(ValueError, match="plan"):
        hybrid_attention(q, k, v, HybridPlan.uniform(1, 3, seq_len_k=16, window=4, rank=4))
    with pytest.raises(TypeError, match="HybridPlan"):
        hybrid_attention(q, k, v, "exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        hybrid_attention(q, k, v, plan, backend="cuda")
    with pytest.raises(ValueError, match="causal"):
        hybrid_attention(q, k, v, plan, causal="diagonal")
    with pytest.raises(ValueError, match="scale"):
        hybrid_attention(q, k, v, plan, scale=-1.0)
    with pytest.raises(ValueError, match="multiple"):
        hybrid_attention(
            q, k[:, :1].expand(1, 3, 16, 8).contiguous(), v[:, :1].expand(1, 3, 16, 8), plan
        )
    with pytest.raises(ValueError, match="empty"):
        hybrid_attention(q[:, :, :0], k, v, plan)
    with pytest.raises(TypeError, match="dtype"):
        hybrid_attention(q.int(), k.int(), v.int(), plan)
    with pytest.raises(ValueError, match="triton"):
        hybrid_attention(q.double(), k.double(), v.double(), plan, backend="triton")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients_pass_gradcheck(causal):
    # The hybrid op's backward differentiates this reference, so its gradients are checked
    # here against finite differences in float64 (sinks, window and pooled far field all
    # active; GQA with two query heads per KV head; the lse output included).
    g = torch.Generator().manual_seed(31)
    q = torch.randn(1, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 16, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 16, 4, generator=g, dtype=torch.float64, requires_grad=True)
    plan = HybridPlan.uniform(1, 2, seq_len_k=16, window=3, rank=4, sinks=1)

    def fn(q, k, v):
        return hybrid_attention_reference(q, k, v, plan, causal=causal, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_gradients_equal_dense_when_window_covers_everything():
    # w ≥ seq: the hybrid plan is exact attention, so its gradients must be dense attention's.
    g = torch.Generator().manual_seed(32)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64) for _ in range(3))
    do = torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64)
    plan = HybridPlan.uniform(1, 2, seq_len_k=20, window=20, rank=4, sinks=1)

    def grads(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv) * do).sum().backward()
        return qq.grad, kk.grad, vv.grad

    got = grads(lambda a, b, c: hybrid_attention_reference(a, b, c, plan, causal=True))
    want = grads(lambda a, b, c: attention_reference(a, b, c, causal=True))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
