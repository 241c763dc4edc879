"""CPU tests of the plain-PyTorch attention reference and of argument validation."""

from __future__ import annotations

import math

import adaattn_kernels
import pytest
import torch
from adaattn_kernels import attention, attention_reference
from hypothesis import given, settings
from hypothesis import strategies as st


def _dense_f64(q, k, v, mask=None, causal_offset=None, scale=None):
    """Textbook float64 attention: materialised scores, explicit softmax (Vaswani et al. Eq. 1)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal_offset is not None:
        sq, sk = s.shape[-2:]
        allowed = torch.ones(sq, sk, dtype=torch.bool).tril(causal_offset)
        s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _qkv(b, hq, hkv, sq, sk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, sq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, sk, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, sk, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("causal", "offset"), [(False, None), (True, "br"), ("bottom_right", "br"), ("top_left", 0)]
)
@pytest.mark.parametrize(("sq", "sk"), [(37, 37), (23, 61), (61, 23)])
def test_reference_matches_float64(dtype, causal, offset, sq, sk):
    q, k, v = _qkv(2, 4, 2, sq, sk, 16, dtype, seed=sq + sk)
    out, lse = attention_reference(q, k, v, causal=causal, return_lse=True)
    off = None if offset is None else (sk - sq if offset == "br" else 0)
    ref, ref_lse = _dense_f64(q, k, v, causal_offset=off)
    # float32 accumulation of ~60-term dot products and sums: error ≈ 1e-7 relative; float64 ~1e-16.
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype
    assert _rel(out, ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _rel(lse[finite], ref_lse[finite]) < tol
    # Fully masked rows (bottom-right with sq > sk): output 0, lse -inf, no NaN.
    assert not out.isnan().any()
    assert (out[~finite] == 0).all()


def test_reference_masks_scale_and_chunking(monkeypatch):
    from adaattn_kernels.flash import naive

    monkeypatch.setattr(naive, "_MAX_CHUNK_ELEMENTS", 300)  # force many query chunks
    q, k, v = _qkv(2, 6, 3, 45, 40, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(2, 1, 45, 40, generator=g) > 0.5
    keep[1, 0, 3] = False
    add = torch.randn(45, 40, generator=g, dtype=torch.float64)
    for mask in (keep, add):
        out, lse = attention_reference(q, k, v, attn_mask=mask, scale=0.3, return_lse=True)
        ref, ref_lse = _dense_f64(q, k, v, mask=mask, scale=0.3)
        assert _rel(out, ref) < 1e-12
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert _rel(lse[fin], ref_lse[fin]) < 1e-12
    out = attention_reference(q, k, v, attn_mask=keep)
    assert (out[1, :, 3] == 0).all()


def test_reference_gradients_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 7, 9, 4, seed=5))
    mask = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, m: attention_reference(q, k, v, attn_mask=m, causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_auto_and_reference_backends_agree_on_cpu():
    q, k, v = _qkv(1, 4, 4, 20, 20, 32, torch.float32, seed=6)
    a = attention(q, k, v, causal=True)
    b = attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert adaattn_kernels.TRITON_HEAD_DIMS == (32, 64, 96, 128, 256)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    d=st.sampled_from([1, 5, 16]),
    causal=st.sampled_from([False, True, "top_left"]),
)
def test_reference_hypothesis(b, hkv, group, sq, sk, d, causal):
    q, k, v = _qkv(b, hkv * group, hkv, sq, sk, d, seed=sq * 41 + sk)
    out, lse = attention_reference(q, k, v, causal=causal, return_lse=True)
    off = None if causal is False else (0 if causal == "top_left" else sk - sq)
    ref, ref_lse = _dense_f64(q, k, v, causal_offset=off)
    assert out.shape == q.shape
    assert lse.shape == q.shape[:-1]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Validation: every error names the argument.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [attention, attention_reference])
def test_validation_errors_name_the_argument(fn):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16, torch.float32)
    bad = [
        ((q[0], k, v), {}, ValueError, "`q` must be 4-D"),
        ((q, k[:, :, :0], v[:, :, :0]), {}, ValueError, "`k` is empty"),
        ((q, k.double(), v), {}, ValueError, "share one dtype"),
        ((q.int(), k, v), {}, TypeError, "`q` has dtype"),
        ((q, k, v[..., :8]), {}, ValueError, "`v` must have the shape of `k`"),
        ((q[:, :3], k, v), {}, ValueError, "not a multiple"),
        ((q, k[..., :8], v[..., :8]), {}, ValueError, "head_dim"),
        ((q, k, v), {"causal": "upper"}, ValueError, "`causal`"),
        ((q, k, v), {"scale": -1.0}, ValueError, "`scale`"),
        ((q, k, v), {"scale": "x"}, TypeError, "`scale`"),
        ((q, k, v), {"attn_mask": torch.ones(3, 8, dtype=torch.bool)}, ValueError, "broadcast"),
        ((q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.int32)}, TypeError, "attn_mask"),
        ((q, torch.cat([k, k], 0), torch.cat([v, v], 0)), {}, ValueError, "batch size"),
    ]
    for args, kwargs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn(*args, **kwargs)


def test_backend_argument():
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="`backend`"):
        attention(q, k, v, backend="cuda")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA"):
            attention(q.half(), k.half(), v.half(), backend="triton")


@pytest.mark.parametrize(
    ("hq", "hkv", "sq", "sk", "causal"),
    [(4, 2, 23, 37, True), (2, 2, 30, 30, "top_left"), (3, 1, 37, 23, True), (2, 1, 16, 40, False)],
)
def test_backward_reference_equals_autograd(hq, hkv, sq, sk, causal):
    # The explicit backward (the Triton backward op's contract) against autograd through the
    # forward reference, float64, with an lse gradient; Sq > Sk bottom-right has rows that see
    # no key (lse = -inf, zero gradients).
    from adaattn_kernels.flash.naive import attention_backward_reference

    g = torch.Generator().manual_seed(sq * sk + hq)
    q, k, v = (
        torch.randn(2, h, s, 16, generator=g, dtype=torch.float64)
        for h, s in ((hq, sq), (hkv, sk), (hkv, sk))
    )
    do = torch.randn(2, hq, sq, 16, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, hq, sq, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, causal=causal, scale=0.3, return_lse=True)
    ((out * do).sum() + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()).backward()
    dlse_used = torch.where(torch.isinf(lse), 0, dlse)
    got = attention_backward_reference(
        do, q, k, v, out.detach(), lse.detach(), dlse_used, causal=causal, scale=0.3
    )
    for name, a, leaf in zip(("dq", "dk", "dv"), got, leaves):
        assert leaf.grad is not None
        torch.testing.assert_close(a, leaf.grad, rtol=1e-10, atol=1e-12, msg=name)
