"""Cheap per-head statistics of attention inputs, used to predict quantisation error.

:func:`tensor_stats` reduces a ``(B, H, S, D)`` tensor in one pass over its elements
(O(B·H·S·D), no S×S work) to per-(batch, head) scalars and per-channel moments. The
per-channel second moments are what the error model of
:func:`adaattn_precision.select_precision` needs: the mean square of a score
``q·k = Σ_d q_d k_d`` over all query/key pairs is ``Σ_d E[q_d²] E[k_d²]`` when queries
and keys are drawn independently.

The channel mean matters for K: SageAttention (Zhang et al. 2024, "SageAttention:
Accurate 8-bit attention for plug-and-play inference acceleration", Sec. 3.2) observes
that K has a large per-channel offset shared by all tokens; subtracting K's mean over the
sequence shifts every score of a query by the same constant, which softmax cancels
exactly, and removes most of the 8-bit quantisation error. The ``centered_*`` fields
describe the smoothed tensor ``x - mean_s(x)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = ["STRATA_EDGES", "TensorStats", "tensor_stats"]

#: Probability edges of the token strata used for token-norm quantiles: 16 equal strata
#: plus a finer split of the top 1/16 so the largest tokens (which dominate a peaked
#: softmax) are represented. Stratum ``i`` covers ranks in ``[E[i], E[i+1])``.
STRATA_EDGES: tuple[float, ...] = (*(i / 16 for i in range(16)), 0.99, 0.999, 1.0)


def _strata_levels() -> tuple[float, ...]:
    """Representative level per stratum: its midpoint, and the maximum for the last one."""
    e = STRATA_EDGES
    mids = [(a + b) / 2 for a, b in itertools.pairwise(e[:-1])]
    return (*mids, 1.0)


@dataclass(frozen=True)
class TensorStats:
    """Per-(batch, head) statistics of a ``(B, H, S, D)`` tensor.

    Scalar fields have shape ``(B, H)``; channel fields ``(B, H, D)``. All are float32
    (float64 for float64 input) on the input's device.

    Attributes:
        amax: ``max |x|``.
        rms: Root mean square ``sqrt(mean x²)``.
        dynamic_range: ``amax / rms`` (1 for constant magnitude; large for outliers).
        outlier_ratio: Largest channel RMS over the median channel RMS (≥ 1; e.g. ≈ 20
            for a head with a few 20× channels).
        mean_offset: Fraction of RMS carried by the channel means,
            ``‖mean_s x‖₂ / sqrt(Σ_d mean_s x_d²)`` in [0, 1]; near 1 for K with a large
            per-channel offset.
        centered_amax: ``max |x - mean_s x|`` (the smoothed tensor's maximum).
        token_ms_quantiles: ``(B, H, L)`` quantiles of the per-token mean square
            ``mean_d x[s, d]²`` divided by its mean over tokens, one per stratum of
            :data:`STRATA_EDGES` (midpoint level; the last is the maximum).
        centered_token_ms_quantiles: The same for the smoothed tensor ``x - mean_s x``.
        channel_mean: ``mean_s x[..., s, d]``.
        channel_ms: ``mean_s x[..., s, d]²`` (second moment, not centred).
        seq_len: ``S``.
        head_dim: ``D``.
    """

    amax: torch.Tensor
    rms: torch.Tensor
    dynamic_range: torch.Tensor
    outlier_ratio: torch.Tensor
    mean_offset: torch.Tensor
    centered_amax: torch.Tensor
    token_ms_quantiles: torch.Tensor
    centered_token_ms_quantiles: torch.Tensor
    channel_mean: torch.Tensor
    channel_ms: torch.Tensor
    seq_len: int
    head_dim: int

    def __post_init__(self) -> None:
        bh = tuple(self.amax.shape)
        if len(bh) != 2:
            raise ValueError(f"amax must have shape (B, H), got {bh}")
        for name in ("rms", "dynamic_range", "outlier_ratio", "mean_offset", "centered_amax"):
            if tuple(getattr(self, name).shape) != bh:
                raise ValueError(
                    f"{name} must have shape {bh}, got {tuple(getattr(self, name).shape)}"
                )
        for name in ("channel_mean", "channel_ms"):
            shape = tuple(getattr(self, name).shape)
            if shape != (*bh, self.head_dim):
                raise ValueError(f"{name} must have shape {(*bh, self.head_dim)}, got {shape}")
        nl = len(STRATA_EDGES) - 1
        for name in ("token_ms_quantiles", "centered_token_ms_quantiles"):
            shape = tuple(getattr(self, name).shape)
            if shape != (*bh, nl):
                raise ValueError(f"{name} must have shape {(*bh, nl)}, got {shape}")
        if self.seq_len < 1 or self.head_dim < 1:
            raise ValueError(
                f"seq_len and head_dim must be >= 1, got {self.seq_len}, {self.head_dim}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, H)``."""
        return (int(self.amax.shape[0]), int(self.amax.shape[1]))

    @property
    def channel_var(self) -> torch.Tensor:
        """Per-channel variance over the sequence, ``channel_ms - channel_mean²`` (≥ 0)."""
        return (self.channel_ms - self.channel_mean**2).clamp_min(0)

    @property
    def centered_rms(self) -> torch.Tensor:
        """RMS of the smoothed tensor ``x - mean_s x``, shape ``(B, H)``."""
        return self.channel_var.mean(dim=-1).sqrt()


def _check_qkv(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


@torch.no_grad()
def tensor_stats(x: torch.Tensor, *, name: str = "x") -> TensorStats:
    """Compute :class:`TensorStats` for ``x`` of shape ``(B, H, S, D)``.

    Args:
        x: Query, key or value tensor; any floating dtype; finite; non-empty.
        name: Argument name used in error messages (e.g. ``"q"``).

    Returns:
        Per-(batch, head) statistics, computed in float32 (float64 for float64 input).

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` is not 4-D, is empty, or contains NaN/Inf.
    """
    x = _check_qkv(x, name)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().to(work)
    s, d = int(x.shape[-2]), int(x.shape[-1])
    amax = xf.abs().amax(dim=(-2, -1))
    channel_mean = xf.mean(dim=-2)
    channel_ms = (xf * xf).mean(dim=-2)
    ms = channel_ms.mean(dim=-1)
    rms = ms.sqrt()
    tiny = torch.finfo(work).tiny
    dynamic_range = torch.where(rms > 0, amax / rms.clamp_min(tiny), torch.ones_like(rms))
    channel_rms = channel_ms.sqrt()
    median = channel_rms.median(dim=-1).values
    outlier_ratio = torch.where(
        median > 0,
        channel_rms.amax(dim=-1) / median.clamp_min(tiny),
        torch.where(channel_rms.amax(dim=-1) > 0, torch.full_like(median, float("inf")), 1.0),
    )
    mean_offset = torch.where(
        ms > 0, ((channel_mean**2).sum(-1) / (channel_ms.sum(-1)).clamp_min(tiny)).sqrt(), 0.0
    ).clamp(0, 1)
    centered = xf - channel_mean[..., None, :]
    centered_amax = centered.abs().amax(dim=(-2, -1))
    return TensorStats(
        amax=amax,
        rms=rms,
        dynamic_range=dynamic_range,
        outlier_ratio=outlier_ratio,
        mean_offset=mean_offset,
        centered_amax=centered_amax,
        token_ms_quantiles=_token_quantiles(xf),
        centered_token_ms_quantiles=_token_quantiles(centered),
        channel_mean=channel_mean,
        channel_ms=channel_ms,
        seq_len=s,
        head_dim=d,
    )


def _token_quantiles(x: torch.Tensor) -> torch.Tensor:
    """Stratum quantiles of the per-token mean square, normalised by its mean."""
    tok = (x * x).mean(dim=-1)  # (B, H, S)
    mean = tok.mean(dim=-1, keepdim=True)
    ratio = torch.where(mean > 0, tok / mean.clamp_min(torch.finfo(x.dtype).tiny), 1.0)
    srt = ratio.sort(dim=-1).values
    s = srt.shape[-1]
    idx = torch.tensor(
        [min(s - 1, max(0, round(lv * (s - 1)))) for lv in _strata_levels()],
        device=x.device,
    )
    return srt.index_select(-1, idx)
