from __future__ import annotations

import math

import pytest
import torch
from adaattn_linalg import (
    DenseOperator,
    diagonal_estimate,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_testing import SharedOperator, low_rank_plus_noise, psd_with_spectrum, spectrum


def _slope(budgets, errors):
    x = torch.tensor([math.log(b) for b in budgets], dtype=torch.float64)
    y = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@pytest.fixture(scope="module")
def psd_1_over_i():
    n = 500
    return psd_with_spectrum(n, spectrum("1/i", n), seed=0)


def _mean_rel_err(estimator, a, budget, reps, seed):
    est = estimator(SharedOperator(a, reps), num_matvecs=budget, seed=seed)
    est = est.estimate if hasattr(est, "estimate") else est
    tr = torch.trace(a)
    return float(((est - tr).abs() / tr).mean())


def test_hutchpp_beats_hutchinson_and_rates(psd_1_over_i):
    """Meyer et al. 2021, Thm 1.1: Hutch++ error ~ 1/m, Hutchinson ~ 1/√m on 1/i spectra."""
    a = psd_1_over_i
    budgets = [12, 24, 48, 96, 192]
    reps = 64  # 64 independent estimates per point: the mean is stable to a few percent
    h = [_mean_rel_err(hutchinson_trace, a, m, reps, seed=10 + m) for m in budgets]
    hpp = [_mean_rel_err(hutchpp_trace, a, m, reps, seed=20 + m) for m in budgets]
    xt = [_mean_rel_err(xtrace, a, m, reps, seed=30 + m) for m in budgets]
    for e_h, e_pp, e_x in zip(h, hpp, xt):
        assert e_pp < e_h
        assert e_x < e_h
    s_h, s_pp = _slope(budgets, h), _slope(budgets, hpp)
    print("slopes", s_h, s_pp, h, hpp, xt)
    assert -0.7 < s_h < -0.3, (s_h, h)
    assert -1.4 < s_pp < -0.75, (s_pp, hpp)
    # at the largest budget Hutch++ is several times better, XTrace at least as good
    assert hpp[-1] < h[-1] / 4
    assert xt[-1] < hpp[-1] * 1.1


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sphere"])
def test_hutchinson_unbiased_and_variance(distribution):
    g = torch.Generator().manual_seed(1)
    n = 60
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = x + x.T + 3 * torch.eye(n, dtype=torch.float64)
    reps, m = 4000, 4
    est = hutchinson_trace(
        SharedOperator(a, reps), num_matvecs=m, distribution=distribution, seed=2
    )
    tr = torch.trace(a)
    fro2 = (a * a).sum()
    var_theory = {
        "gaussian": 2 * fro2 / m,
        "rademacher": 2 * (fro2 - (torch.diagonal(a) ** 2).sum()) / m,
    }
    se = est.std() / math.sqrt(reps)
    assert abs(float(est.mean() - tr)) < 5 * float(se)  # unbiased (5-sigma)
    if distribution in var_theory:
        ratio = float(est.var() / var_theory[distribution])
        assert 0.85 < ratio < 1.15  # sample variance of 4000 draws is within ~5 %


def test_xtrace_error_estimate_is_calibrated():
    n = 300
    a = psd_with_spectrum(n, spectrum("exp(-i/10)", n) + 0.01, seed=3)
    reps = 200
    r = xtrace(SharedOperator(a, reps), num_matvecs=40, seed=4)
    actual = (r.estimate - torch.trace(a)).abs()
    rms_actual = float(actual.pow(2).mean().sqrt())
    rms_est = float(r.error.pow(2).mean().sqrt())
    assert 0.3 < rms_est / rms_actual < 3.0, (rms_est, rms_actual)
    assert (r.error > 0).all()


def test_exact_cases_and_small_shapes():
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 5):
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        tr = torch.trace(a)
        # XTrace with k >= n and Hutch++ with k1 = n are exact
        torch.testing.assert_close(xtrace(a, num_matvecs=2 * n + 4, seed=0).estimate, tr)
        torch.testing.assert_close(hutchpp_trace(a, num_matvecs=3 * n, seed=0), tr)
    # 1x1 with Rademacher: z a z = a
    one = torch.tensor([[2.5]], dtype=torch.float64)
    torch.testing.assert_close(
        hutchinson_trace(one, num_matvecs=1, seed=0), torch.tensor(2.5).double()
    )
    # low-rank matrix (rank < k): XTrace sketch is singular and the projected trace is exact
    u = torch.randn(50, 3, generator=g, dtype=torch.float64)
    lr = u @ u.T
    r = xtrace(lr, num_matvecs=20, seed=1)
    torch.testing.assert_close(r.estimate, torch.trace(lr), rtol=1e-8, atol=0)
    assert float(r.error) == 0.0


def test_operator_input_and_structured_matrix():
    a = low_rank_plus_noise(200, 200, 5, 0.01, seed=6)
    a = a @ a.T  # PSD, low rank + noise
    op = DenseOperator(a)
    tr = float(torch.trace(a))
    assert abs(float(hutchpp_trace(op, num_matvecs=60, seed=0)) - tr) / tr < 1e-2
    assert abs(float(xtrace(op, num_matvecs=60, seed=0).estimate) - tr) / tr < 1e-2
    # same seed → same answer for tensor and operator
    torch.testing.assert_close(
        hutchpp_trace(op, num_matvecs=30, seed=3), hutchpp_trace(a, num_matvecs=30, seed=3)
    )


def test_diagonal_estimate():
    g = torch.Generator().manual_seed(7)
    n = 80
    d = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 1
    off = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.05
    a = torch.diag(d) + off
    est = diagonal_estimate(a, num_matvecs=400, seed=0)
    # error per entry ~ ‖off row‖ / √m ≈ 0.05·√80/20 ≈ 0.022
    assert float((est - torch.diagonal(a)).abs().max()) < 0.15
    diag_a = torch.diag(d)
    torch.testing.assert_close(diagonal_estimate(diag_a, num_matvecs=1, seed=0), d)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 30),
    batch=st.sampled_from([(), (2,), (2, 3)]),
    m=st.integers(4, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_shapes_dtypes_property(n, batch, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    a = (a @ a.mT).to(dtype)
    for fn in (hutchinson_trace, hutchpp_trace):
        out = fn(a, num_matvecs=m, seed=seed)
        assert out.shape == batch
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
    r = xtrace(a, num_matvecs=m, seed=seed)
    assert r.estimate.shape == batch
    assert torch.isfinite(r.estimate).all()
    if m // 2 >= n:  # exact regime
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(
            r.estimate.double(),
            torch.diagonal(a.double(), dim1=-2, dim2=-1).sum(-1),
            rtol=tol,
            atol=tol,
        )
    assert diagonal_estimate(a, num_matvecs=m, seed=seed).shape == (*batch, n)


def test_half_precision_matrix_computed_in_fp32():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(20, 20, generator=g).to(torch.bfloat16)
    out = hutchpp_trace(a, num_matvecs=60, seed=0)  # k1 = 20 = n: exact
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.trace(a.double()), rtol=1e-5, atol=1e-5)


def test_validation():
    a = torch.randn(5, 5)
    with pytest.raises(ValueError, match="square"):
        hutchinson_trace(torch.randn(4, 5), num_matvecs=3)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(a, num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs"):
        xtrace(a, num_matvecs=3)
    with pytest.raises(TypeError, match="num_matvecs"):
        hutchinson_trace(a, num_matvecs=2.0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(a, num_matvecs=3, distribution="uniform")
    with pytest.raises(TypeError, match="`A`"):
        hutchinson_trace(a.int(), num_matvecs=3)
    with pytest.raises(TypeError, match="`A`"):
        hutchinson_trace([[1.0]], num_matvecs=3)
    with pytest.raises(ValueError, match="`A`"):
        hutchinson_trace(torch.full((3, 3), float("inf")), num_matvecs=3)
    with pytest.raises(ValueError, match="`A`"):
        hutchinson_trace(torch.empty(0, 0), num_matvecs=3)
    with pytest.raises(ValueError, match="`A`"):
        hutchinson_trace(torch.ones(3), num_matvecs=3)
