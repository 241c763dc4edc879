"""The hybrid Triton kernels: on CUDA, or on CPU through Triton's interpreter.

On a machine without CUDA these tests need ``TRITON_INTERPRET=1`` set before Triton is imported
(the ``tests-cpu`` nox session exports it for the whole run); otherwise they skip with that
reason. Shapes are small because the interpreter runs every program instance in NumPy; its tiles
are 32×16, so lengths like 70 and 90 exercise ragged tails, windows and segments that straddle
tiles, and query blocks whose rows see different far-field segments.
"""

from __future__ import annotations

import os

import pytest
import torch
from adaattn_kernels import attention, attention_reference
from adaattn_kernels.hybrid import (
    HybridPlan,
    build_far_field,
    hybrid_attention,
    hybrid_attention_reference,
    pooled_far_field_reference,
)

if torch.cuda.is_available():
    DEV = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEV = "cpu"
else:
    DEV = None

pytestmark = pytest.mark.skipif(
    DEV is None,
    reason="needs CUDA, or TRITON_INTERPRET=1 set before triton is imported (nox -s tests-cpu "
    "sets it); the reference is covered by test_hybrid_reference.py",
)

# Relative Frobenius error bounds vs a float64 reference on the same (rounded) inputs.
# fp32 inputs: IEEE fp32 dots and accumulation, errors ~1e-7 relative; 1e-5 catches any
# indexing error (those are O(1)). fp16: P is rounded to fp16 (2^-11 ≈ 4.9e-4) before P·V and
# pooled K/V are stored in fp16, measured ~5e-4; 3e-3 leaves margin. bf16: 8 mantissa bits
# (2^-9 ≈ 2e-3) for the same roundings; 1.5e-2.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
CAUSALS = [False, True, "top_left"]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    return q, k, v


def _mixed_plan(sk: int, heads: int = 4) -> HybridPlan:
    """Per-head plans: several windows/sinks/segment sizes and one exact head, one launch."""
    w = torch.tensor([5, 17, 3, 8, 30, 1][:heads])
    r = torch.tensor([7, sk, 10, 3, 5, 9][:heads])
    s = torch.tensor([2, 0, 5, 1, 0, 3][:heads])
    ex = torch.tensor([False, False, True, False, False, False][:heads])
    return HybridPlan.build(1, heads, seq_len_k=sk, window=w, rank=r, sinks=s, exact=ex, device=DEV)


def _check_against_reference(q, k, v, plan, causal, tol):
    out, lse = hybrid_attention(q, k, v, plan, causal=causal, return_lse=True, backend="triton")
    ref, lse_ref = hybrid_attention_reference(
        q.double(), k.double(), v.double(), plan, causal=causal, return_lse=True
    )
    assert out.dtype == q.dtype
    assert out.shape == q.shape
    assert bool(torch.isfinite(out).all())
    assert _rel(out, ref) < tol
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    assert float((lse.double() - lse_ref)[fin].abs().max()) < 50 * tol


@pytest.mark.parametrize("causal", CAUSALS)
def test_mixed_plan_matches_reference_fp16(causal):
    q, k, v = _inputs(1, 4, 2, 70, 70, 32, torch.float16, seed=1)
    _check_against_reference(q, k, v, _mixed_plan(70), causal, TOL[torch.float16])


@pytest.mark.parametrize(("sq", "sk", "causal"), [(40, 90, False), (90, 40, True), (33, 90, True)])
def test_mixed_plan_rectangular(sq, sk, causal):
    # (90, 40, bottom-right): the first 50 queries see no key -> output 0, lse -inf.
    q, k, v = _inputs(1, 4, 2, sq, sk, 32, torch.float16, seed=sq + sk)
    _check_against_reference(q, k, v, _mixed_plan(sk), causal, TOL[torch.float16])


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_plan_exact_heads_run_the_dense_kernel(causal):
    # 16-bit mixed plans send their exact heads to the dense kernel (a launch over those heads
    # only, into the same output): bit-identical to the dense kernel on every head, batch 2.
    q, k, v = _inputs(2, 6, 3, 70, 70, 32, torch.float16, seed=9)
    ex = torch.tensor(
        [[True, False, False, True, False, True], [False, True, True, False, False, False]]
    )
    plan = HybridPlan.build(2, 6, seq_len_k=70, window=8, rank=10, sinks=2, exact=ex, device=DEV)
    out, lse = hybrid_attention(q, k, v, plan, causal=causal, return_lse=True, backend="triton")
    dense, dense_lse = attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    assert torch.equal(out[ex], dense[ex])
    assert torch.equal(lse[ex], dense_lse[ex])
    assert not torch.equal(out[~ex], dense[~ex])  # the hybrid heads are approximations
    _check_against_reference(q, k, v, plan, causal, TOL[torch.float16])


def test_mixed_plan_fp32_tight():
    q, k, v = _inputs(1, 6, 3, 75, 75, 32, torch.float32, seed=4)
    _check_against_reference(q, k, v, _mixed_plan(75, heads=6), True, TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_wide_windows_unmasked_interior(causal):
    """Windows much wider than a query block: the unmasked interior-tile path of the kernel."""
    q, k, v = _inputs(1, 2, 1, 128, 128, 32, torch.float32, seed=6)
    plan = HybridPlan.build(1, 2, seq_len_k=128, window=torch.tensor([64, 80]),
                            rank=torch.tensor([32, 16]), sinks=torch.tensor([3, 0]),
                            device=DEV)  # fmt: skip
    _check_against_reference(q, k, v, plan, causal, TOL[torch.float32])


def test_mixed_plan_bf16():
    q, k, v = _inputs(1, 4, 1, 64, 64, 32, torch.bfloat16, seed=5)
    _check_against_reference(q, k, v, _mixed_plan(64), False, TOL[torch.bfloat16])


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(d):
    q, k, v = _inputs(1, 2, 1, 48, 48, d, torch.float16, seed=d)
    plan = HybridPlan.build(1, 2, seq_len_k=48, window=torch.tensor([6, 11]), rank=8, sinks=1,
                            device=DEV)  # fmt: skip
    _check_against_reference(q, k, v, plan, True, TOL[torch.float16])


@pytest.mark.parametrize("causal", [False, True])
def test_exact_limits_equal_exact_attention(causal):
    """Segment size 1 (r = Sk) and window ≥ Sk reproduce exact attention (fp32, IEEE dots)."""
    sq = sk = 67
    q, k, v = _inputs(1, 3, 3, sq, sk, 32, torch.float32, seed=8)
    plan = HybridPlan(
        torch.tensor([[4, sk, 1]], dtype=torch.int32, device=DEV),
        torch.tensor([[3, 0, 0]], dtype=torch.int32, device=DEV),
        torch.tensor([[1, 5, 0]], dtype=torch.int32, device=DEV),  # g=1 | w>=Sk | exact
    )
    out = hybrid_attention(q, k, v, plan, causal=causal, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert _rel(out, ref) < TOL[torch.float32]


def test_all_exact_plan_equals_exact_attention():
    """No hybrid head at all: no pooled buffers are built; bottom-right causal, Sq < Sk."""
    q, k, v = _inputs(1, 2, 1, 40, 57, 32, torch.float32, seed=10)
    out = hybrid_attention(q, k, v, HybridPlan.exact(1, 2, device=DEV), causal=True,
                           backend="triton")  # fmt: skip
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel(out, ref) < TOL[torch.float32]


def test_piecewise_constant_segments_exact_in_kernel():
    """Constant keys/values per segment: pooled + log n_t is exact for any plan (fp32)."""
    sq = sk = 64
    g = 4
    q, k, v = _inputs(1, 2, 1, sq, sk, 32, torch.float32, seed=12)
    idx = (torch.arange(sk, device=DEV) // g) * g
    k, v = k[:, :, idx].contiguous(), v[:, :, idx].contiguous()
    plan = HybridPlan.build(1, 2, seq_len_k=sk, window=torch.tensor([5, 9]), rank=sk // g,
                            sinks=torch.tensor([1, 0]), device=DEV)  # fmt: skip
    for causal in (False, True):
        out = hybrid_attention(q, k, v, plan, causal=causal, backend="triton")
        ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
        assert _rel(out, ref) < TOL[torch.float32]


def test_far_field_kernel_matches_reference():
    _, k, v = _inputs(2, 1, 2, 1, 45, 32, torch.float16, seed=13)
    plan = HybridPlan.build(
        2, 4, seq_len_k=45, window=4, rank=torch.tensor([[6, 45, 1, 7], [2, 5, 6, 9]]),
        exact=torch.tensor([[False, False, False, True], [False] * 4]), device=DEV,
    )  # fmt: skip
    kp, vp = build_far_field(k, v, plan, backend="triton")
    kr, vr = pooled_far_field_reference(k.double(), v.double(), plan, heads_q=4)
    assert kp.shape == kr.shape == (2, 4, 45, 32)
    assert kp.dtype == torch.float16
    # means of fp16 values accumulated in fp32, rounded once to fp16: |err| ≤ 2^-11 · |mean|.
    torch.testing.assert_close(kp.double(), kr, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vp.double(), vr, rtol=1e-3, atol=1e-3)


def test_backward_matches_reference_gradients():
    q, k, v = _inputs(1, 2, 1, 40, 40, 32, torch.float32, seed=14)
    plan = HybridPlan.uniform(1, 2, seq_len_k=40, window=6, rank=8, sinks=1, device=DEV)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(15)).to(DEV)

    def grads(fn, backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv, plan, causal=True, return_lse=True, backend=backend)
        ((out * do).sum() + 0.5 * lse.sum()).backward()
        return qq.grad, kk.grad, vv.grad

    got = grads(hybrid_attention, "triton")
    want = grads(hybrid_attention, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
