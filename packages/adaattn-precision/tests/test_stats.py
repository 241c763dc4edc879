"""TensorStats against direct float64 computations."""

from __future__ import annotations

import pytest
import torch
from adaattn_precision import tensor_stats
from adaattn_precision.calibrate import synthetic_qkv
from adaattn_precision.stats import STRATA_EDGES
from hypothesis import given, settings
from hypothesis import strategies as st


def test_stats_match_float64_reference() -> None:
    _q, k, _ = synthetic_qkv(seq_len=200, head_dim=32, batch=2, heads=3, k_offset=3.0, seed=1)
    st_k = tensor_stats(k)
    x = k.double()
    assert st_k.shape == (2, 3)
    assert st_k.seq_len == 200
    assert st_k.head_dim == 32
    # float32 reductions over 6400 elements: relative error ~1e-6
    torch.testing.assert_close(st_k.amax.double(), x.abs().amax(dim=(-2, -1)), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        st_k.rms.double(), x.pow(2).mean(dim=(-2, -1)).sqrt(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(st_k.channel_mean.double(), x.mean(-2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        st_k.channel_var.double(), x.var(-2, unbiased=False), rtol=1e-4, atol=1e-5
    )
    xc = x - x.mean(-2, keepdim=True)
    torch.testing.assert_close(
        st_k.centered_amax.double(), xc.abs().amax(dim=(-2, -1)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        st_k.centered_rms.double(), xc.pow(2).mean(dim=(-2, -1)).sqrt(), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(st_k.dynamic_range, st_k.amax / st_k.rms)


def test_offset_and_outliers_are_detected() -> None:
    q, k, _ = synthetic_qkv(seq_len=512, head_dim=64, q_outliers=3, k_offset=10.0, seed=2)
    sq, sk = tensor_stats(q), tensor_stats(k)
    # Q: 3 channels at 20x -> max channel rms / median channel rms ~ 20
    assert (sq.outlier_ratio > 15).all()
    assert (sq.outlier_ratio < 30).all()
    # K: offset ~10 per channel vs unit noise -> ~99% of the energy is in the mean
    assert (sk.mean_offset > 0.95).all()
    assert (sq.mean_offset < 0.2).all()
    plain = tensor_stats(synthetic_qkv(seq_len=512, head_dim=64, seed=3)[0])
    assert (plain.outlier_ratio < 1.5).all()


def test_token_quantiles() -> None:
    q, _, _ = synthetic_qkv(seq_len=1000, head_dim=16, dist="student_t", seed=4)
    s = tensor_stats(q)
    levels = len(STRATA_EDGES) - 1
    assert s.token_ms_quantiles.shape == (1, 2, levels)
    assert (s.token_ms_quantiles.diff(dim=-1) >= 0).all()
    tok = q.double().pow(2).mean(-1)
    ratio_max = tok.amax(-1) / tok.mean(-1)
    torch.testing.assert_close(s.token_ms_quantiles[..., -1].double(), ratio_max, rtol=1e-5, atol=0)


def test_float64_input_keeps_float64() -> None:
    x = torch.randn(1, 1, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert tensor_stats(x).rms.dtype == torch.float64


def test_bad_inputs_name_argument() -> None:
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, S, D\)"):
        tensor_stats(x[0], name="q")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        tensor_stats(bad, name="k")
    with pytest.raises(TypeError, match="v must be a float"):
        tensor_stats(x.to(torch.int64), name="v")
    with pytest.raises(ValueError, match="non-empty"):
        tensor_stats(torch.empty(1, 2, 0, 4))


def test_all_zero_input_is_well_defined() -> None:
    s = tensor_stats(torch.zeros(1, 1, 4, 4))
    assert s.amax.item() == 0
    assert s.rms.item() == 0
    assert s.dynamic_range.item() == 1
    assert s.outlier_ratio.item() == 1
    assert s.mean_offset.item() == 0
    assert torch.isfinite(s.token_ms_quantiles).all()


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    s=st.integers(1, 70),
    d=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
def test_property_shapes_and_ranges(b: int, h: int, s: int, d: int, seed: int) -> None:
    x = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(seed)) * 3
    st_ = tensor_stats(x)
    assert st_.shape == (b, h)
    assert (st_.dynamic_range >= 1 - 1e-6).all()
    assert (st_.outlier_ratio >= 1 - 1e-6).all()
    assert ((st_.mean_offset >= 0) & (st_.mean_offset <= 1)).all()
    assert (st_.centered_amax <= 2 * st_.amax + 1e-6).all()
    assert st_.channel_mean.shape == (b, h, d)
