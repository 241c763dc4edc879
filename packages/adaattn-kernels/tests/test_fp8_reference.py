"""The float8 reference of FP8 attention, the planner's error probe and the API's checks (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from adaattn_kernels import attention_reference
from adaattn_kernels.fp8 import (
    fp8_attention,
    fp8_attention_error,
    fp8_attention_reference,
)
from adaattn_kernels.fp8.api import _capability_reason
from adaattn_precision import DeviceProperties, capability_from_properties
from hypothesis import given, settings
from hypothesis import strategies as st


def _inputs(b, hq, hkv, sq, sk, d, *, seed=0, dtype=torch.bfloat16, k_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g) + k_offset * torch.randn(d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# Error of FP8 attention vs exact float64 on i.i.d. N(0, 1) inputs. e4m3 keeps 3 mantissa bits:
# each rounded element has relative error ≤ 2^-4 (rms ≈ 2.5 %), so the scores carry noise of
# rms ≈ √2 · 2.5 % ≈ 3.6 % of their size; on nearly uniform attention that noise passes to the
# output one-to-one (adaattn_precision.select, step 3). Measured on this case: 3.9e-2 (P·V in
# bf16) and 5.3e-2 (P·V in e4m3, which adds the rounding of P and V). The bounds leave ~1.5×
# margin and are still 10× below what any indexing or scaling bug gives (O(1)).
FP8_NORMAL_BOUND = {"fp8": 8e-2, "fp16": 6e-2}


@pytest.mark.parametrize("pv_dtype", ["fp8", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_error_vs_exact_is_fp8_rounding(pv_dtype, causal):
    q, k, v = _inputs(1, 2, 1, 256, 256, 64, seed=1)
    out, lse = fp8_attention_reference(q, k, v, causal=causal, pv_dtype=pv_dtype, return_lse=True)
    exact, lse_exact = attention_reference(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True
    )
    err = _rel(out, exact)
    assert 5e-3 < err < FP8_NORMAL_BOUND[pv_dtype]  # not exact (it is quantised), not broken
    # lse: scores carry ~3.6 % noise; the log-sum-exp averages it over keys.
    assert float((lse.double() - lse_exact).abs().max()) < 5e-2


def test_k_smoothing_removes_channel_offsets():
    """A large per-channel offset of K must not change the error: softmax cancels q·mean(K)."""
    q, k, v = _inputs(1, 2, 2, 256, 256, 64, seed=2)
    _, k_off, _ = _inputs(1, 2, 2, 256, 256, 64, seed=2, k_offset=30.0)
    base = fp8_attention_error(q, k, v).max()
    off = fp8_attention_error(q, k_off, v).max()
    # Without smoothing the offset (30× the spread) would take the quantisation range and the
    # error would be O(1); with it both are at the e4m3 level.
    assert off < 1.5 * base + 1e-2
    assert off < FP8_NORMAL_BOUND["fp8"]


def test_reference_lse_includes_the_smoothing_shift():
    q, k, v = _inputs(1, 1, 1, 64, 96, 64, seed=3, k_offset=10.0)
    _, lse = fp8_attention_reference(q, k, v, return_lse=True)
    _, lse_exact = attention_reference(q.double(), k.double(), v.double(), return_lse=True)
    # |τ q·mean(K)| is ~10 here: forgetting it would be off by that much.
    assert float((lse.double() - lse_exact).abs().max()) < 0.1


@pytest.mark.parametrize("causal", [False, True, "top_left"])
def test_rows_select_exactly_the_full_rows(causal):
    q, k, v = _inputs(2, 4, 2, 70, 90, 64, seed=4)
    full, lse = fp8_attention_reference(q, k, v, causal=causal, return_lse=True, tile_n=32)
    rows = torch.tensor([0, 5, 33, 69, 12])
    part, lse_p = fp8_attention_reference(
        q, k, v, causal=causal, return_lse=True, tile_n=32, rows=rows
    )
    assert torch.equal(part, full[:, :, rows])
    assert torch.equal(lse_p, lse[:, :, rows])


def test_error_probe_matches_its_definition():
    q, k, v = _inputs(1, 4, 2, 128, 128, 64, seed=5)
    rows = torch.arange(0, 128, 7)
    err = fp8_attention_error(q, k, v, rows=rows, causal=True)
    assert err.shape == (1, 4)
    approx = fp8_attention_reference(q, k, v, causal=True)[:, :, rows].double()
    exact = attention_reference(q.double(), k.double(), v.double(), causal=True)[:, :, rows]
    manual = (approx - exact).flatten(2).norm(dim=-1) / exact.flatten(2).norm(dim=-1)
    torch.testing.assert_close(err, manual.float(), rtol=1e-5, atol=0)


def test_rows_without_keys_give_zero_and_minus_inf():
    # Bottom-right causal with Sq > Sk: query i sees keys j ≤ i − 16, so rows 0..15 see none.
    q, k, v = _inputs(1, 2, 1, 48, 32, 64, seed=6)
    out, lse = fp8_attention_reference(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    assert bool(torch.isneginf(lse[:, :, :16]).all())
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(lse[:, :, 16:]).all())


@settings(max_examples=8, deadline=None)
@given(
    sq=st.integers(1, 80),
    sk=st.integers(1, 80),
    group=st.sampled_from([1, 2]),
    causal=st.sampled_from([False, True, "top_left"]),
    granularity=st.sampled_from(["block", "token"]),
    block_size=st.sampled_from([1, 16, 100]),
)
def test_reference_is_finite_and_close_on_odd_shapes(
    sq, sk, group, causal, granularity, block_size
):
    q, k, v = _inputs(1, 2 * group, 2, sq, sk, 64, seed=sq * 100 + sk)
    out, lse = fp8_attention_reference(
        q, k, v, causal=causal, granularity=granularity, block_size=block_size,
        return_lse=True, tile_n=32,
    )  # fmt: skip
    exact = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert not bool(torch.isnan(out).any())
    assert not bool(torch.isnan(lse).any())
    seen = torch.isfinite(lse)
    if bool(seen.any()):
        # Tiny problems: few keys, little averaging; per-row errors stay at the e4m3 level.
        rel = (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-6)
        assert float(rel[seen].max()) < 0.35


def test_float8_reference_accepts_float32_and_fp16():
    for dtype in (torch.float32, torch.float16):
        q, k, v = _inputs(1, 1, 1, 40, 40, 64, seed=7, dtype=dtype)
        out = fp8_attention_reference(q, k, v)
        assert out.dtype == dtype
        assert _rel(out, attention_reference(q.double(), k.double(), v.double())) < 0.1


# ---------------------------------------------------------------------------------------------
# Argument checks of the public API (every message names the argument).
# ---------------------------------------------------------------------------------------------


def test_api_cpu_auto_is_the_reference():
    q, k, v = _inputs(1, 2, 1, 50, 60, 64, seed=8)
    with torch.no_grad():
        out, lse = fp8_attention(q, k, v, causal=True, return_lse=True)
    ref, lse_ref = fp8_attention_reference(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, ref)
    assert torch.equal(lse, lse_ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pv_dtype": "int8"}, "pv_dtype"),
        ({"granularity": "tensor"}, "granularity"),
        ({"block_size": 0}, "block_size"),
        ({"backend": "cuda"}, "backend"),
        ({"causal": "diagonal"}, "causal"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_api_rejects_bad_options(kwargs, match):
    q, k, v = _inputs(1, 1, 1, 8, 8, 64)
    with pytest.raises(ValueError, match=match):
        fp8_attention(q, k, v, **kwargs)


def test_api_rejects_bad_inputs():
    q, k, v = _inputs(1, 2, 1, 8, 8, 64)
    with pytest.raises(TypeError, match="dtype"):
        fp8_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="multiple"):
        fp8_attention(q[:, :1].repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="no backward"):
        fp8_attention(q.float().requires_grad_(), k.float(), v.float())
    bad = k.clone()
    bad[0, 0, 3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fp8_attention(q, bad, v)
    with pytest.raises(ValueError, match="rows"):
        fp8_attention_reference(q, k, v, rows=torch.tensor([8]))
    with pytest.raises(TypeError, match="block_size"):
        fp8_attention(q, k, v, block_size=128.0)


def test_triton_backend_on_plain_cpu_names_the_capability(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 1, 1, 8, 8, 64)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        fp8_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    ("props", "ok"),
    [
        (DeviceProperties("NVIDIA A100-SXM4-80GB", 8, 0, 108, 80 << 30), False),
        (DeviceProperties("NVIDIA L4", 8, 9, 58, 24 << 30), True),
        (DeviceProperties("NVIDIA H100 80GB HBM3", 9, 0, 132, 80 << 30), True),
    ],
)
def test_capability_rule_uses_adaattn_precision(props, ok):
    reason = _capability_reason(capability_from_properties(props, triton=True))
    if ok:
        assert reason is None
    else:
        assert reason is not None
        assert "fp8_e4m3" in reason
        assert "8.0" in reason
