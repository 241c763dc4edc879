from __future__ import annotations

import pytest
import torch
from adaattn_linalg import DenseOperator, randomized_svd
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_testing import low_rank_plus_noise, spectrum, with_spectrum


def _spec_err(a, r):
    return torch.linalg.matrix_norm(
        a.double() - (r.U.double() * r.S.double()[..., None, :]) @ r.V.double().mT, ord=2
    )


@pytest.mark.parametrize("kind", ["1/i", "exp(-i/10)", "1/i^2"])
@pytest.mark.parametrize(("m", "n", "k"), [(300, 200, 10), (150, 400, 20), (120, 120, 40)])
def test_defaults_near_optimal_on_decaying_spectra(kind, m, n, k):
    sig = spectrum(kind, min(m, n))
    a = with_spectrum(m, n, sig, seed=m + n + k)
    r = randomized_svd(a, k, seed=0)
    assert r.U.shape == (m, k)
    assert r.S.shape == (k,)
    assert r.V.shape == (n, k)
    err = float(_spec_err(a, r))
    assert err <= 1.1 * float(sig[k]), (err, float(sig[k]))
    # singular values agree with the exact ones (float64 reference)
    torch.testing.assert_close(r.S, sig[:k], rtol=2e-2, atol=0)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(r.U.T @ r.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(r.V.T @ r.V, eye, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    a = with_spectrum(200, 150, spectrum("exp(-i/10)", 150), seed=1).to(dtype)
    r = randomized_svd(a, 12, seed=0)
    assert r.S.dtype == torch.float32
    # exact reference of the same (rounded) matrix; float32 arithmetic adds ~1e-6 · σ₁
    ref = torch.linalg.svdvals(a.double())
    torch.testing.assert_close(r.S.double(), ref[:12], rtol=1e-3, atol=1e-5)
    assert float(_spec_err(a, r)) <= 1.1 * float(ref[12]) + 1e-5


def test_batched_equals_unbatched_and_deterministic_signs():
    a = torch.stack([with_spectrum(80, 60, spectrum("1/i", 60), seed=s) for s in range(6)])
    a = a.reshape(2, 3, 80, 60)
    r = randomized_svd(a, 5, seed=3)
    assert r.U.shape == (2, 3, 80, 5)
    ref = torch.linalg.svdvals(a)[..., :5]
    torch.testing.assert_close(r.S, ref, rtol=1e-3, atol=0)
    r2 = randomized_svd(a, 5, seed=3)
    assert torch.equal(r.U, r2.U)
    assert torch.equal(r.V, r2.V)
    # signs do not depend on the random sketch: another seed gives the same vectors
    r3 = randomized_svd(a, 5, seed=99)
    torch.testing.assert_close(r3.U[..., :3], r.U[..., :3], atol=1e-4, rtol=0)
    idx = r.U.abs().argmax(-2, keepdim=True)
    assert (torch.gather(r.U, -2, idx) > 0).all()


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 7), (7, 1), (3, 5), (6, 4)])
def test_tiny_matrices_are_exact(m, n):
    """torch.svd_lowrank fails when the sketch exceeds the matrix (pytorch#72909); we cap it."""
    g = torch.Generator().manual_seed(m * 10 + n)
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    r = randomized_svd(a, k, seed=0)
    torch.testing.assert_close(r.S, torch.linalg.svdvals(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((r.U * r.S) @ r.V.T, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalizer", ["qr", "lu", "none", "auto"])
def test_normalizers_and_operator_input(normalizer):
    a = low_rank_plus_noise(150, 120, 8, 1e-3, seed=4)
    ref = torch.linalg.svdvals(a)
    r = randomized_svd(DenseOperator(a), 8, normalizer=normalizer, n_iter=3, seed=0)
    torch.testing.assert_close(r.S, ref[:8], rtol=1e-6, atol=0)
    assert float(_spec_err(a, r)) <= 1.1 * float(ref[8])


def test_exactly_low_rank_matrix():
    a = low_rank_plus_noise(60, 50, 4, 0.0, seed=5)  # rank 4 < sketch 14
    for normalizer in ("qr", "lu"):
        r = randomized_svd(a, 6, normalizer=normalizer, seed=0)
        assert torch.isfinite(r.U).all()
        assert torch.isfinite(r.V).all()
        torch.testing.assert_close((r.U * r.S) @ r.V.T, a, rtol=0, atol=1e-9)
        assert float(r.S[4:].max()) < 1e-9 * float(r.S[0])


def test_n_iter_auto_rule_and_more_iterations_help():
    sig = spectrum("1/i", 200)
    a = with_spectrum(200, 200, sig, seed=6)
    errs = [float(_spec_err(a, randomized_svd(a, 10, n_iter=q, seed=1))) for q in (0, 1, 4)]
    assert errs[0] > errs[1] > errs[2] >= float(sig[10]) * (1 - 1e-9)


def test_at_least_as_accurate_as_sklearn():
    extmath = pytest.importorskip("sklearn.utils.extmath")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    ratios = []
    # One thread for every BLAS/OpenMP pool: numpy's spinning BLAS threads and torch's OpenMP
    # threads would otherwise fight over CI's two cores.
    with threadpoolctl.threadpool_limits(limits=1):
        for seed, kind in enumerate(["1/i", "exp(-i/10)", "1/i", "exp(-i/10)"]):
            sig = spectrum(kind, 300)
            a = with_spectrum(300, 300, sig, seed=100 + seed)
            k = 15
            ours = float(_spec_err(a, randomized_svd(a, k, oversampling=10, seed=seed)))
            u, s, vt = extmath.randomized_svd(a.numpy(), k, n_oversamples=10, random_state=seed)
            approx = (torch.from_numpy(u) * torch.from_numpy(s)) @ torch.from_numpy(vt)
            theirs = float(torch.linalg.matrix_norm(a - approx, ord=2))
            ratios.append(ours / theirs)
            assert ours <= 1.1 * float(sig[k])
    # same sketch size and iterations: equal accuracy up to the sketch's randomness (< 1 %)
    assert max(ratios) < 1.01, ratios


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 25),
    n=st.integers(1, 25),
    frac=st.floats(0.01, 1.0),
    batch=st.sampled_from([(), (3,)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_shapes_property(m, n, frac, batch, dtype, seed):
    k = max(1, min(min(m, n), round(frac * min(m, n))))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, m, n, generator=g, dtype=torch.float64).to(dtype)
    r = randomized_svd(a, k, seed=seed)
    assert r.U.shape == (*batch, m, k)
    assert r.V.shape == (*batch, n, k)
    assert r.S.shape == (*batch, k)
    ref = torch.linalg.svdvals(a.double())
    if k + 10 >= min(m, n):  # sketch covers the whole range: exact
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(r.S.double(), ref[..., :k], rtol=tol, atol=tol)
    assert (r.S.double() <= ref[..., :k] * (1 + 1e-5) + 1e-6).all()  # Ritz values never exceed σ


def test_validation():
    a = torch.randn(10, 8)
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match="rank"):
            randomized_svd(a, bad)
    with pytest.raises(TypeError, match="rank"):
        randomized_svd(a, 2.5)
    with pytest.raises(ValueError, match="oversampling"):
        randomized_svd(a, 2, oversampling=-1)
    with pytest.raises(ValueError, match="n_iter"):
        randomized_svd(a, 2, n_iter="fast")
    with pytest.raises(ValueError, match="normalizer"):
        randomized_svd(a, 2, normalizer="householder")
    with pytest.raises(TypeError, match="`A`"):
        randomized_svd(a.long(), 2)
    with pytest.raises(ValueError, match="`A`"):
        randomized_svd(torch.full((4, 4), float("nan")), 2)
    with pytest.raises(ValueError, match="`A`"):
        randomized_svd(torch.empty(0, 4), 1)
    with pytest.raises(ValueError, match="`A`"):
        randomized_svd(torch.ones(4), 1)
