from __future__ import annotations

import math

import pytest
import torch
from adaattn_linalg import (
    DenseOperator,
    effective_rank,
    numerical_rank,
    spectral_norm,
    stable_rank,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_testing import low_rank_plus_noise, spectrum, with_spectrum


@pytest.mark.parametrize("kind", ["1/i", "exp(-i/10)"])
def test_spectral_norm_matches_svd(kind):
    sig = spectrum(kind, 60) * 3.0
    a = with_spectrum(80, 60, sig, seed=1)
    est = spectral_norm(a, seed=0)
    # residual tol 1e-4 → eigenvalue of AᵀA within ~tol²/gap: far below 1e-6 relative here
    torch.testing.assert_close(est, sig[0], rtol=1e-6, atol=0)
    est32 = spectral_norm(a.float(), seed=0)
    torch.testing.assert_close(est32.double(), sig[0], rtol=1e-5, atol=0)
    assert float(est) <= float(sig[0]) * (1 + 1e-12)  # Rayleigh quotient is a lower bound


def test_spectral_norm_batched_operator_and_warning():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 2, 40, 30, generator=g, dtype=torch.float64)
    ref = torch.linalg.matrix_norm(a, ord=2)
    est = spectral_norm(DenseOperator(a), tol=1e-7, max_iter=5000, seed=1)
    assert est.shape == (3, 2)
    torch.testing.assert_close(est, ref, rtol=1e-8, atol=0)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        spectral_norm(a, tol=1e-12, max_iter=2, seed=0)
    z = torch.zeros(4, 4)
    z[0, 0] = 1e-30  # essentially zero but finite: still fine
    assert float(spectral_norm(z, seed=0)) == pytest.approx(1e-30, rel=1e-5)


def test_effective_rank_definition():
    # r equal singular values → erank = r; Roy–Vetterli eq. (3) on a known spectrum
    s = torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(effective_rank(s, singular_values=True), torch.tensor(3.0).double())
    sig = spectrum("1/i", 50)
    p = sig / sig.sum()
    expected = torch.exp(-(p * p.log()).sum())
    a = with_spectrum(70, 50, sig, seed=3)
    torch.testing.assert_close(effective_rank(a), expected, rtol=1e-10, atol=0)
    assert float(effective_rank(torch.zeros(3, 3))) == 0.0
    one = torch.tensor([[5.0]])
    assert float(effective_rank(one)) == pytest.approx(1.0)


def test_stable_rank_definition_and_operator_estimate():
    sig = spectrum("exp(-i/10)", 40)
    a = with_spectrum(60, 40, sig, seed=4)
    expected = (sig**2).sum() / sig[0] ** 2
    torch.testing.assert_close(stable_rank(a), expected, rtol=1e-10, atol=0)
    est = stable_rank(DenseOperator(a), num_matvecs=2000, seed=0)
    # Hutchinson on AᵀA with 2000 probes: relative std ≈ √(2/2000 · ‖AᵀA‖²_F/tr²) < 2 %
    torch.testing.assert_close(est, expected, rtol=0.06, atol=0)
    assert float(stable_rank(torch.zeros(2, 2))) == 0.0


def test_numerical_rank_definition():
    a = low_rank_plus_noise(50, 40, 7, 0.0, seed=5)
    assert int(numerical_rank(a)) == 7
    assert int(numerical_rank(a)) == int(torch.linalg.matrix_rank(a))
    s = torch.tensor([1.0, 0.5, 0.011, 0.009])
    assert int(numerical_rank(s, singular_values=True, rtol=1e-2)) == 3
    assert int(numerical_rank(s, singular_values=True, rtol=0.0, atol=0.4)) == 2
    noisy = low_rank_plus_noise(50, 40, 7, 1e-6, seed=6)
    assert int(numerical_rank(noisy)) == 40
    assert int(numerical_rank(noisy, rtol=1e-4)) == 7


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_rank_measures_ordering_property(m, n, seed, dtype):
    """Effective and stable rank lie in [1, rank(A)] (Roy & Vetterli 2007, Prop. 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    r = int(numerical_rank(a))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    er, sr = float(effective_rank(a)), float(stable_rank(a))
    assert 1 - tol <= er <= r + tol
    assert 1 - tol <= sr <= r + tol
    s = torch.linalg.svdvals(a.double())
    p = s / s.sum()
    assert er == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-4)
    torch.testing.assert_close(
        spectral_norm(a, seed=seed, tol=1e-6, max_iter=20000).double(),
        s[0],
        rtol=1e-3 if dtype == torch.float32 else 1e-5,
        atol=1e-6,
    )


def test_validation():
    with pytest.raises(ValueError, match="tol"):
        spectral_norm(torch.eye(3), tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        spectral_norm(torch.eye(3), max_iter=0)
    with pytest.raises(ValueError, match="singular values"):
        effective_rank(torch.tensor([1.0, -1.0]), singular_values=True)
    with pytest.raises(ValueError, match="`A`"):
        effective_rank(torch.ones(3))
    with pytest.raises(TypeError, match="`A`"):
        stable_rank(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="rtol"):
        numerical_rank(torch.eye(3), rtol=-1.0)
    with pytest.raises(ValueError, match="`A`"):
        numerical_rank(torch.full((3, 3), float("nan")))
