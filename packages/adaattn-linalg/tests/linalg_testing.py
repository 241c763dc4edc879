"""Float64 references and structured test matrices shared by the adaattn-linalg tests."""

from __future__ import annotations

import torch


def orthogonal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with random orthonormal ``U`` (m × r), ``V`` (n × r), float64."""
    g = torch.Generator().manual_seed(seed)
    r = sigma.numel()
    return (orthogonal(m, r, g) * sigma.double()) @ orthogonal(n, r, g).T


def spectrum(kind: str, r: int) -> torch.Tensor:
    i = torch.arange(1, r + 1, dtype=torch.float64)
    return {"1/i": 1.0 / i, "exp(-i/10)": torch.exp(-(i - 1) / 10), "1/i^2": 1.0 / i**2}[kind]


def psd_with_spectrum(n: int, eig: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = orthogonal(n, n, g)
    return (u * eig.double()) @ u.T


def low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g, dtype=torch.float64)
    b = torch.randn(r, n, generator=g, dtype=torch.float64)
    return a @ b + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def dense_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "bottom_right",
    mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Float64 masked scores (-inf = not attended), GQA by repeat_interleave."""
    q, k = q.double(), k.double()
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.mT) * scale
    sq, sk = s.shape[-2:]
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    off = sk - sq if alignment == "bottom_right" else 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed &= j <= i + off
    if window is not None:
        c = i + off
        allowed &= j > c - window
        allowed &= (j <= c) if causal else (j < c + window)
    s = s.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return s


def dense_entropy(s: torch.Tensor) -> torch.Tensor:
    """Exact float64 entropy of softmax rows (fully masked rows → 0)."""
    s = s.double()
    lse = torch.logsumexp(s, -1, keepdim=True)
    alive = torch.isfinite(lse)
    p = torch.exp(s - torch.where(alive, lse, 0.0))
    logp = torch.where(p > 0, s - lse, 0.0)
    h = -(p * logp).sum(-1)
    return torch.where(alive.squeeze(-1), h, 0.0)


def dense_probs(s: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    return torch.nan_to_num(p, nan=0.0)


class SharedOperator:
    """One matrix seen as a batch of ``reps`` identical ones (each batch entry draws its own
    probes); matmul broadcasts instead of copying the matrix ``reps`` times."""

    def __init__(self, a: torch.Tensor, reps: int) -> None:
        self.a = a
        self.reps = reps

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.reps, *self.a.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @staticmethod
    def _fold(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # one GEMM for all batch entries: (n, n) @ (n, reps * k)
        reps, n, k = x.shape
        y = a @ x.permute(1, 0, 2).reshape(n, reps * k)
        return y.reshape(a.shape[0], reps, k).permute(1, 0, 2)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fold(self.a, x)

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fold(self.a.T, x)
