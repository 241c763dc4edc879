from __future__ import annotations

import pytest
import torch
from adaattn_linalg import (
    AttentionOperator,
    DenseOperator,
    LinearOperator,
    as_operator,
    hutchinson_trace,
    hutchpp_trace,
    randomized_svd,
    spectral_norm,
    xtrace,
)
from linalg_testing import dense_entropy, dense_probs, dense_scores


def _qk(b, hq, hkv, sq, sk, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, sq, d, generator=g).to(dtype),
        torch.randn(b, hkv, sk, d, generator=g).to(dtype),
    )


def test_protocol_and_dense_operator():
    a = torch.randn(2, 5, 3)
    op = DenseOperator(a)
    assert isinstance(op, LinearOperator)
    assert op.shape == (2, 5, 3)
    assert op.dtype == torch.float32
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(op.matmul(x), a @ x)
    torch.testing.assert_close(
        op.rmatmul(torch.randn(2, 5, 4).mul(0) + 1), a.mT @ torch.ones(2, 5, 4)
    )
    assert as_operator(op) is op
    assert isinstance(as_operator(a), DenseOperator)
    half = DenseOperator(a.half())
    assert half.dtype == torch.float32
    with pytest.raises(TypeError, match="LinearOperator"):
        as_operator(object())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("sq", "sk"), [(48, 48), (30, 70), (70, 30)])
def test_attention_operator_matches_dense(causal, sq, sk):
    q, k = _qk(2, 4, 2, sq, sk, 8, seed=sq + sk)
    op = AttentionOperator(q, k, causal=causal, block_q=16, block_k=16)
    assert op.shape == (2, 4, sq, sk)
    s = dense_scores(q, k, causal=causal)
    p = dense_probs(s)  # fully masked rows (bottom-right, sq > sk) are zero rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, sk, 3, generator=g)
    y = torch.randn(2, 4, sq, 5, generator=g)
    # fp32 probabilities (≤ 1, ~1e-7 relative) times O(1) vectors summed over ≤ 70 keys
    torch.testing.assert_close(op.matmul(x).double(), p @ x.double(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(op.rmatmul(y).double(), p.mT @ y.double(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(op.to_dense().double(), p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(op.row_entropy.double(), dense_entropy(s), atol=1e-5, rtol=0)
    lse_ref = torch.logsumexp(s, -1)
    torch.testing.assert_close(op.logsumexp.double(), lse_ref, atol=1e-5, rtol=1e-6)


def test_attention_operator_with_mask_float64():
    q, k = _qk(1, 2, 1, 20, 25, 4, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(20, 25, generator=g) > 0.3
    mask[5] = False
    op = AttentionOperator(q, k, mask=mask, block_q=7, block_k=6)
    p = dense_probs(dense_scores(q, k, mask=mask))
    torch.testing.assert_close(op.to_dense(), p, atol=1e-14, rtol=0)
    assert (op.to_dense()[..., 5, :] == 0).all()


def test_estimators_on_attention_operator():
    q, k = _qk(1, 2, 2, 96, 96, 16, seed=5)
    q = q * 2.0
    op = AttentionOperator(q, k, causal=True, block_q=32, block_k=32)
    p = dense_probs(dense_scores(q, k, causal=True))
    sv = torch.linalg.svdvals(p)
    r = randomized_svd(op, 6, n_iter=4, seed=0)
    torch.testing.assert_close(r.S.double(), sv[..., :6], rtol=2e-2, atol=1e-5)
    resid = p - (r.U.double() * r.S.double()[..., None, :]) @ r.V.double().mT
    assert (torch.linalg.matrix_norm(resid, ord=2) <= 1.1 * sv[..., 6] + 1e-5).all()
    torch.testing.assert_close(spectral_norm(op, seed=0).double(), sv[..., 0], rtol=1e-4, atol=0)
    tr = torch.diagonal(p, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(
        xtrace(op, num_matvecs=200, seed=0).estimate.double(), tr, rtol=1e-4, atol=1e-4
    )
    assert hutchpp_trace(op, num_matvecs=30, seed=0).shape == (1, 2)
    assert hutchinson_trace(op, num_matvecs=8, seed=0).shape == (1, 2)


def test_attention_operator_validation():
    q, k = _qk(1, 2, 2, 8, 8, 4, seed=6)
    op = AttentionOperator(q, k)
    with pytest.raises(ValueError, match="rows"):
        op.matmul(torch.randn(1, 2, 7, 3))
    with pytest.raises(ValueError, match="batch"):
        op.matmul(torch.randn(3, 2, 8, 3))
    with pytest.raises(TypeError, match="`x`"):
        op.rmatmul(torch.ones(1, 2, 8, 3, dtype=torch.long))
    # broadcasting a shared block over heads is fine
    assert op.matmul(torch.randn(8, 2)).shape == (1, 2, 8, 2)
