"""Linear operators: a small protocol, a dense wrapper and the implicit attention matrix.

Every estimator in this package (:mod:`~adaattn_linalg.trace`, :mod:`~adaattn_linalg.svd`,
:mod:`~adaattn_linalg.spectral`) touches a matrix only through ``matmul`` (``A @ X``) and
``rmatmul`` (``Aᵀ @ X``) on a block of vectors, so it runs on anything that implements
:class:`LinearOperator` — in particular on :class:`AttentionOperator`, which applies
``softmax(q kᵀ · scale)`` without ever materialising the ``Sq × Sk`` matrix.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from adaattn_linalg import _attention
from adaattn_linalg._validation import check_tensor, compute_dtype

__all__ = ["AttentionOperator", "DenseOperator", "LinearOperator", "as_operator"]


@runtime_checkable
class LinearOperator(Protocol):
    """A (batch of) matrices ``A`` of shape ``(..., m, n)`` known through products with blocks.

    Attributes:
        shape: ``(*batch, m, n)``.
        dtype: Floating dtype of the products (float32 or float64).
        device: Device the products live on.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch, m, n)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the results of :meth:`matmul` and :meth:`rmatmul`."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the results of :meth:`matmul` and :meth:`rmatmul`."""
        ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``A @ x`` for a block ``x`` of shape ``(*batch, n, r)`` → ``(*batch, m, r)``."""
        ...

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``Aᵀ @ x`` for a block ``x`` of shape ``(*batch, m, r)`` → ``(*batch, n, r)``."""
        ...


def _check_block(x: Any, name: str, batch: tuple[int, ...], rows: int) -> torch.Tensor:
    x = check_tensor(x, name, min_ndim=2, finite=False, allow_empty=True)
    if x.shape[-2] != rows:
        raise ValueError(f"`{name}` must have {rows} rows (dim -2), got shape {tuple(x.shape)}")
    try:
        out = torch.broadcast_shapes(tuple(x.shape[:-2]), batch)
    except RuntimeError:
        out = None
    if out != torch.Size(batch):
        raise ValueError(
            f"`{name}` batch dims {tuple(x.shape[:-2])} do not broadcast to the operator's "
            f"batch dims {batch}"
        )
    return x.expand(*batch, *x.shape[-2:])


class DenseOperator:
    """Wrap a dense tensor ``A`` of shape ``(..., m, n)`` as a :class:`LinearOperator`.

    Half-precision inputs are stored in float32 so that every product runs in float32 or better.

    Args:
        a: The matrix (batch). Must be finite and floating point.
    """

    def __init__(self, a: torch.Tensor) -> None:
        a = check_tensor(a, "A", min_ndim=2)
        self.a = a.to(compute_dtype(a.dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch, m, n)``."""
        return tuple(self.a.shape)

    @property
    def dtype(self) -> torch.dtype:
        """float32 or float64."""
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        """Device of the wrapped tensor."""
        return self.a.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x``."""
        return torch.matmul(self.a, x.to(self.a.dtype))

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ x``."""
        return torch.matmul(self.a.mT, x.to(self.a.dtype))

    def __repr__(self) -> str:
        return f"DenseOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def as_operator(a: Any, name: str = "A") -> LinearOperator:
    """Return ``a`` as a :class:`LinearOperator` (tensors are wrapped in :class:`DenseOperator`).

    Raises:
        TypeError: ``a`` is neither a tensor nor an object with ``shape``, ``dtype``, ``device``,
            ``matmul`` and ``rmatmul``; or its dtype is not floating point.
        ValueError: fewer than two dimensions, an empty dimension, or non-finite entries.
    """
    if isinstance(a, torch.Tensor):
        check_tensor(a, name, min_ndim=2)
        return DenseOperator(a)
    if not isinstance(a, LinearOperator):
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a LinearOperator (shape, dtype, device, matmul, "
            f"rmatmul), got {type(a).__name__}"
        )
    shape = tuple(a.shape)
    if len(shape) < 2:
        raise ValueError(f"`{name}` must have shape (..., m, n), got {shape}")
    if any(int(s) <= 0 for s in shape):
        raise ValueError(f"`{name}` has an empty dimension: shape {shape}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`{name}` must compute in float32 or float64, got {a.dtype}")
    return a


class AttentionOperator:
    """The attention matrix ``A = softmax(q kᵀ · scale)`` as an implicit :class:`LinearOperator`.

    Shape ``(*B, Hq, Sq, Sk)``: row ``i`` of head ``h`` is the attention distribution of query
    ``i`` over the keys. Construction runs one streaming pass (online log-sum-exp, Milakov &
    Gimelshein 2018; FlashAttention, Dao et al. 2022, Alg. 1) and stores the row log-sum-exp
    ``L_i`` (O(Sq) memory). Afterwards ``A_ij = exp(s_ij - L_i)`` is recomputed tile by tile, so
    :meth:`matmul` (``A X``) and :meth:`rmatmul` (``Aᵀ X``) need O(seq · (d + r)) memory plus one
    score tile. Randomized SVD, trace estimation and spectral norms of a real attention matrix at
    seq 32k therefore run without forming it.

    Rows with no attended key (fully masked) are zero rows, like FlashAttention's output.

    Args:
        q: Queries ``(*B, Hq, Sq, D)``.
        k: Keys ``(*B, Hkv, Sk, D)``; ``Hq`` must be a multiple of ``Hkv`` (grouped-query
            attention, query head ``h`` reads key head ``h // (Hq // Hkv)``).
        scale: Score scale; default ``1/√D``.
        causal: ``False`` (default); ``True`` or ``"bottom_right"``: query ``i`` may see keys
            ``j ≤ i + Sk - Sq`` (FlashAttention ≥ 2.1, ``causal_lower_right``, and
            ``adaattn_kernels.attention``); ``"top_left"``: keys ``j ≤ i``, what
            ``scaled_dot_product_attention(is_causal=True)`` does. Same when ``Sq == Sk``.
        mask: Boolean (True = may attend) or additive float mask broadcastable to
            ``(*B, Hq, Sq, Sk)``.
        block_q: Query rows per tile (default: chosen from the problem size).
        block_k: Keys per tile (default: chosen from the problem size).
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool | str = False,
        mask: torch.Tensor | None = None,
        block_q: int | None = None,
        block_k: int | None = None,
    ) -> None:
        self._p = _attention.prepare(
            q,
            k,
            scale=scale,
            causal=causal,
            mask=mask,
            block_q=block_q,
            block_k=block_k,
        )
        stats = _attention.stream_stats(self._p)
        lse = stats.lse
        # exp(s - (+inf)) = 0 makes fully masked rows zero rows without NaN.
        self._lse = torch.where(torch.isfinite(lse), lse, float("inf"))
        self._entropy = stats.entropy

    @property
    def shape(self) -> tuple[int, ...]:
        """``(*B, Hq, Sq, Sk)``."""
        return (*self._p.batch_shape, self._p.rows, self._p.sk)

    @property
    def dtype(self) -> torch.dtype:
        """float32 (float64 when ``q`` and ``k`` are float64)."""
        return self._p.q.dtype

    @property
    def device(self) -> torch.device:
        """Device of ``q`` and ``k``."""
        return self._p.q.device

    @property
    def logsumexp(self) -> torch.Tensor:
        """Row log-sum-exp ``L_i = log Σ_j e^{s_ij}``, shape ``(*B, Hq, Sq)``; -inf if masked."""
        lse = torch.where(torch.isfinite(self._lse), self._lse, float("-inf"))
        return self._p.unflatten(lse)

    @property
    def row_entropy(self) -> torch.Tensor:
        """Shannon entropy (nats) of each row, shape ``(*B, Hq, Sq)``, from the same pass."""
        return self._p.unflatten(self._entropy)

    def _probs(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        s = self._p.scores(i0, i1, j0, j1)
        s.sub_(self._lse[..., i0:i1, None])
        return s.exp_()

    def _flat(self, x: torch.Tensor, name: str, rows: int) -> torch.Tensor:
        batch = tuple(self.shape[:-2])
        x = _check_block(x, name, batch, rows)
        return x.reshape(self._p.n, self._p.hq, rows, x.shape[-1]).to(self.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for ``x`` of shape ``(*B, Hq, Sk, r)`` → ``(*B, Hq, Sq, r)``."""
        p = self._p
        xf = self._flat(x, "x", p.sk)
        out = torch.zeros((p.n, p.hq, p.rows, xf.shape[-1]), dtype=self.dtype, device=self.device)
        for i0 in range(0, p.rows, p.block_q):
            i1 = min(i0 + p.block_q, p.rows)
            for j0 in range(0, p.sk, p.block_k):
                j1 = min(j0 + p.block_k, p.sk)
                if p.tile_empty(i0, i1, j0, j1):
                    continue
                out[:, :, i0:i1] += torch.matmul(self._probs(i0, i1, j0, j1), xf[:, :, j0:j1])
        return p.unflatten(out)

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ x`` for ``x`` of shape ``(*B, Hq, Sq, r)`` → ``(*B, Hq, Sk, r)``."""
        p = self._p
        xf = self._flat(x, "x", p.rows)
        out = torch.zeros((p.n, p.hq, p.sk, xf.shape[-1]), dtype=self.dtype, device=self.device)
        for i0 in range(0, p.rows, p.block_q):
            i1 = min(i0 + p.block_q, p.rows)
            for j0 in range(0, p.sk, p.block_k):
                j1 = min(j0 + p.block_k, p.sk)
                if p.tile_empty(i0, i1, j0, j1):
                    continue
                pt = self._probs(i0, i1, j0, j1).transpose(-1, -2)
                out[:, :, j0:j1] += torch.matmul(pt, xf[:, :, i0:i1])
        return p.unflatten(out)

    def to_dense(self) -> torch.Tensor:
        """Materialise ``A`` (``(*B, Hq, Sq, Sk)``); for tests and small problems only."""
        p = self._p
        eye = torch.eye(p.sk, dtype=self.dtype, device=self.device)
        return self.matmul(eye.expand(*self.shape[:-2], p.sk, p.sk))

    def __repr__(self) -> str:
        return f"AttentionOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"
