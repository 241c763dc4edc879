"""Spectral norm by power iteration and three notions of effective rank.

* ``spectral_norm``: ``‖A‖₂ = σ₁`` by power iteration on ``AᵀA`` (Golub & Van Loan 2013,
  *Matrix Computations*, 4th ed., §8.2.1), for tensors or operators.
* ``effective_rank``: Roy & Vetterli (2007), "The effective rank: a measure of effective
  dimensionality", EUSIPCO, Definition 1:
  ``erank(A) = exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and ``H(p) = -Σ_i p_i log p_i``.
* ``stable_rank``: ``‖A‖²_F / ‖A‖²₂ = Σ σ_i² / σ₁²`` (Rudelson & Vershynin 2007, "Sampling from
  large matrices").
* ``numerical_rank``: ``#{i : σ_i > max(atol, rtol · σ₁)}`` (Golub & Van Loan 2013, §5.4.1;
  the rule of ``torch.linalg.matrix_rank`` and ``numpy.linalg.matrix_rank``).

All satisfy ``1 ≤ · ≤ rank(A)`` for a non-zero ``A``; a zero matrix gives 0.
"""

from __future__ import annotations

import warnings

import torch

from adaattn_linalg._validation import (
    check_float,
    check_int,
    check_tensor,
    compute_dtype,
    make_generator,
    randn,
)
from adaattn_linalg.operators import LinearOperator, as_operator
from adaattn_linalg.trace import hutchinson_trace

__all__ = ["effective_rank", "numerical_rank", "spectral_norm", "stable_rank"]


def spectral_norm(
    A: torch.Tensor | LinearOperator,
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Largest singular value ``σ₁ = ‖A‖₂`` by power iteration on ``AᵀA``.

    Golub & Van Loan (2013), §8.2.1 (the power method) applied to ``AᵀA``:
    ``v ← AᵀA v / ‖AᵀA v‖`` from a Gaussian start, with the Rayleigh quotient ``θ = ‖A v‖²`` and
    estimate ``σ = √θ`` (a lower bound that increases to ``σ₁``; its error shrinks like
    ``(σ₂/σ₁)^{4t}``). Iteration stops when the relative residual ``‖AᵀA v - θ v‖ ≤ tol · θ`` for
    every batch entry — then ``AᵀA`` has an eigenvalue within ``tol · θ`` of ``θ`` (the residual
    bound for symmetric matrices, Parlett 1998, *The Symmetric Eigenvalue Problem*, ch. 4), so
    ``σ`` is within about ``tol/2`` relative of a singular value, in practice ``σ₁`` — or after
    ``max_iter`` iterations with a ``RuntimeWarning``. Each iteration costs one
    ``matmul`` and one ``rmatmul``.

    Args:
        A: Matrix (batch) ``(..., m, n)`` or operator.
        tol: Relative residual tolerance (> 0). The error of ``θ`` is at most ``tol · θ`` and,
            with a gap ``δ = σ₁² - σ₂²``, about ``(tol · θ)² / δ``; the default ``1e-4`` gives
            ``σ₁`` to ~1e-7 relative or better on matrices with a visible gap.
        max_iter: Iteration cap (≥ 1).
        seed: Seed for the start vector (exclusive with ``generator``).
        generator: Random generator.

    Returns:
        ``σ₁`` per batch entry, shape ``(...)``.

    Raises:
        TypeError, ValueError: bad ``A`` (see :func:`~adaattn_linalg.operators.as_operator`),
            ``tol ≤ 0``, ``max_iter < 1``.
    """
    op = as_operator(A)
    tol = check_float(tol, "tol", positive=True)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    gen = make_generator(seed, generator, op.device)
    *batch, _m, n = op.shape
    v = randn((*batch, n, 1), dtype=op.dtype, device=op.device, generator=gen)
    v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True)
    theta = torch.zeros(batch, dtype=op.dtype, device=op.device)
    tiny = torch.finfo(op.dtype).tiny
    for _ in range(max_iter):
        av = op.matmul(v)
        theta = (av * av).sum((-2, -1))  # Rayleigh quotient vᵀ AᵀA v (‖v‖ = 1)
        w = op.rmatmul(av)
        resid = torch.linalg.vector_norm(w - theta[..., None, None] * v, dim=(-2, -1))
        w_norm = torch.linalg.vector_norm(w, dim=-2, keepdim=True)
        v = torch.where(w_norm > tiny, w / w_norm.clamp_min(tiny), v)
        if bool((resid <= tol * theta).all()):
            return theta.sqrt()
    warnings.warn(
        f"spectral_norm did not reach tol={tol} in max_iter={max_iter} iterations "
        "(σ₁ ≈ σ₂?); the result is a lower bound. Raise `max_iter` or `tol`.",
        RuntimeWarning,
        stacklevel=2,
    )
    return theta.sqrt()


def _singular_values(x: torch.Tensor, name: str, singular_values: bool) -> torch.Tensor:
    if singular_values:
        s = check_tensor(x, name, min_ndim=1)
        if bool((s < 0).any()):
            raise ValueError(f"`{name}` holds singular values, which must be >= 0")
        return s.to(compute_dtype(s.dtype))
    a = check_tensor(x, name, min_ndim=2)
    return torch.linalg.svdvals(a.to(compute_dtype(a.dtype)))


def effective_rank(A: torch.Tensor, *, singular_values: bool = False) -> torch.Tensor:
    """Roy–Vetterli effective rank ``exp(-Σ_i p_i log p_i)`` with ``p_i = σ_i / Σ_j σ_j``.

    Roy & Vetterli (2007), Definition 1. It equals ``r`` for a matrix with ``r``
    equal non-zero singular values, lies in ``[1, rank(A)]`` and is 0 for the zero matrix
    (where ``p`` is undefined).

    Args:
        A: Matrix (batch) ``(..., m, n)``, or singular values ``(..., r)`` when
            ``singular_values=True``. Singular values are computed exactly
            (``torch.linalg.svdvals``) in float32 (float64 for float64 input).
        singular_values: Treat ``A`` as singular values instead of a matrix.

    Returns:
        Effective rank per batch entry, shape ``(...)``.

    Raises:
        TypeError: non-floating input.
        ValueError: empty or non-finite input, too few dimensions, negative singular values.
    """
    s = _singular_values(A, "A", singular_values)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    h = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))


def stable_rank(
    A: torch.Tensor | LinearOperator,
    *,
    num_matvecs: int = 64,
    tol: float = 1e-4,
    max_iter: int = 500,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stable rank ``‖A‖²_F / ‖A‖²₂ = Σ_i σ_i² / σ₁²`` (Rudelson & Vershynin 2007).

    For a dense tensor both norms are exact (``torch.linalg.svdvals``). For an operator, ``‖A‖₂``
    comes from :func:`spectral_norm` (``tol``, ``max_iter``) and ``‖A‖²_F = tr(AᵀA) = E‖A z‖²``
    from Hutchinson's estimator with ``num_matvecs`` Rademacher probes (Hutchinson 1989), so the
    result is an estimate. Lies in ``[1, rank(A)]``; 0 for the zero matrix.

    Args:
        A: Matrix (batch) ``(..., m, n)`` or operator.
        num_matvecs: Probes for the Frobenius norm of an operator (ignored for tensors).
        tol: Power-iteration tolerance for an operator (ignored for tensors).
        max_iter: Power-iteration cap for an operator (ignored for tensors).
        seed: Seed for an operator's probes (exclusive with ``generator``).
        generator: Random generator.

    Returns:
        Stable rank per batch entry, shape ``(...)``.

    Raises:
        TypeError, ValueError: bad ``A``, ``num_matvecs < 1``.
    """
    if isinstance(A, torch.Tensor):
        s = _singular_values(A, "A", False)
        fro2 = (s * s).sum(-1)
        top2 = s[..., 0] ** 2
    else:
        op = as_operator(A)
        num_matvecs = check_int(num_matvecs, "num_matvecs", minimum=1)
        gen = make_generator(seed, generator, op.device)
        top2 = spectral_norm(op, tol=tol, max_iter=max_iter, generator=gen) ** 2
        fro2 = hutchinson_trace(_Gram(op), num_matvecs=num_matvecs, generator=gen)
    return torch.where(top2 > 0, fro2 / top2.clamp_min(torch.finfo(top2.dtype).tiny), 0.0)


class _Gram:
    """``AᵀA`` as an operator (symmetric)."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    @property
    def shape(self) -> tuple[int, ...]:
        *b, _m, n = self.op.shape
        return (*b, n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmul(self.op.matmul(x))

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def numerical_rank(
    A: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    singular_values: bool = False,
) -> torch.Tensor:
    """Numerical rank ``#{i : σ_i > max(atol, rtol · σ₁)}``.

    Golub & Van Loan (2013), §5.4.1; the same rule as ``torch.linalg.matrix_rank``. The default
    ``rtol`` is ``max(m, n) · ε`` of the compute dtype (``r · ε`` when singular values are given),
    which counts singular values above rounding noise; pass e.g. ``rtol=1e-2`` to count the
    directions holding more than 1 % of the top one.

    Args:
        A: Matrix (batch) ``(..., m, n)``, or singular values ``(..., r)`` when
            ``singular_values=True``.
        rtol: Relative tolerance ``≥ 0``.
        atol: Absolute tolerance ``≥ 0``.
        singular_values: Treat ``A`` as singular values instead of a matrix.

    Returns:
        Integer (int64) rank per batch entry, shape ``(...)``.

    Raises:
        TypeError: non-floating input.
        ValueError: empty or non-finite input, negative tolerances or singular values.
    """
    s = _singular_values(A, "A", singular_values)
    atol = check_float(atol, "atol", nonnegative=True)
    if rtol is None:
        size = s.shape[-1] if singular_values else max(A.shape[-2:])
        rtol = size * torch.finfo(s.dtype).eps
    rtol = check_float(rtol, "rtol", nonnegative=True)
    top = s.amax(-1, keepdim=True)
    thresh = torch.clamp_min(rtol * top, atol)
    return (s > thresh).sum(-1)
