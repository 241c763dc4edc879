"""Reference measurement of the attention error that the error model predicts.

:func:`measure_attention_error` evaluates attention exactly (float64) and with its inputs
rounded as a kernel in a given precision would see them, and returns the per-head relative
Frobenius error. It is the ground truth used to calibrate
:func:`adaattn_precision.predict_attention_error`; it costs O(B·H·S²·D) in float64, so it
is meant for tests, calibration and spot checks, not for the hot path.
"""

from __future__ import annotations

import torch

from .fp8 import dequantize_fp8, quantize_fp8
from .policy import PRECISIONS, FP8Config, is_fp8, torch_dtype
from .stats import _check_qkv

__all__ = ["measure_attention_error", "round_like_kernel", "synthetic_qkv"]


def round_like_kernel(
    x: torch.Tensor, *, precision: str, fp8: FP8Config | None = None, smooth: bool = False
) -> torch.Tensor:
    """Round ``x`` ``(..., S, D)`` as a kernel in ``precision`` sees it; return float64.

    FP8 uses :func:`~adaattn_precision.quantize_fp8` with the recipe ``fp8`` (format taken
    from ``precision``); ``smooth=True`` first subtracts the mean over the sequence (dim -2),
    as done for K. Other precisions are a cast and back.

    Args:
        x: Tensor to round.
        precision: A name from :data:`adaattn_precision.PRECISIONS`.
        fp8: FP8 recipe; default :class:`~adaattn_precision.FP8Config`.
        smooth: Subtract the sequence mean before rounding (the mean is not added back).

    Returns:
        The rounded tensor in float64.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    x64 = x.to(torch.float64)
    if smooth:
        x64 = x64 - x64.mean(dim=-2, keepdim=True)
    if not is_fp8(precision):
        return x64.to(torch_dtype(precision)).to(torch.float64)
    fp8 = fp8 or FP8Config()
    xq, sc = quantize_fp8(
        x64.to(torch.float32),
        fmt=precision[4:],
        granularity=fp8.granularity,
        block_size=fp8.block_size,
        margin=fp8.margin,
        pow2_scales=fp8.pow2_scales,
    )
    return dequantize_fp8(
        xq, sc, granularity=fp8.granularity, block_size=fp8.block_size, dtype=torch.float64
    )


@torch.no_grad()
def measure_attention_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: str,
    scale: float,
    fp8: FP8Config | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Measured relative error ``‖Ô - O‖_F / ‖O‖_F`` per (batch, head).

    ``O`` is float64 attention on the original inputs; ``Ô`` is float64 attention on the
    inputs rounded by :func:`round_like_kernel` (for FP8, K is mean-smoothed first if
    ``fp8.smooth_k``; softmax cancels the shift). The product ``P V`` is exact, matching
    the assumption of the error model.

    Args:
        q: Queries ``(B, H, S_q, D)``.
        k: Keys ``(B, H_kv, S, D)``; ``H`` must be a multiple of ``H_kv``.
        v: Values ``(B, H_kv, S, D_v)``.
        precision: Precision name.
        scale: Softmax scale.
        fp8: FP8 recipe.
        causal: Apply a causal mask aligned to the bottom right (query ``i`` sees keys
            ``0 .. S - S_q + i``).

    Returns:
        float64 tensor of shape ``(B, H)``.
    """
    q, k, v = _check_qkv(q, "q"), _check_qkv(k, "k"), _check_qkv(v, "v")
    fp8 = fp8 or FP8Config()
    rep = q.shape[1] // k.shape[1]
    if q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )

    def attn(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        kk = kk.repeat_interleave(rep, dim=1)
        vv = vv.repeat_interleave(rep, dim=1)
        s = scale * qq @ kk.transpose(-2, -1)
        if causal:
            sq, sk = s.shape[-2], s.shape[-1]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(diagonal=sk - sq)
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ vv

    exact = attn(q.double(), k.double(), v.double())
    smooth = is_fp8(precision) and fp8.smooth_k
    approx = attn(
        round_like_kernel(q, precision=precision, fp8=fp8),
        round_like_kernel(k, precision=precision, fp8=fp8, smooth=smooth),
        round_like_kernel(v, precision=precision, fp8=fp8),
    )
    num = (approx - exact).flatten(-2).norm(dim=-1)
    den = exact.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return num / den


def synthetic_qkv(
    *,
    seq_len: int,
    head_dim: int,
    batch: int = 1,
    heads: int = 2,
    q_scale: float = 1.0,
    q_outliers: int = 0,
    outlier_factor: float = 20.0,
    k_offset: float = 0.0,
    v_mean: float = 0.0,
    dist: str = "normal",
    df: int = 3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic attention inputs with the outlier structure of real LLM heads.

    Q, K, V are i.i.d. ``N(0, 1)`` (``dist="normal"``) or Student-t with ``df`` degrees of
    freedom (``dist="student_t"``), drawn in float64 from a generator seeded with
    ``seed``. Q is multiplied by ``q_scale`` and ``q_outliers`` random channels by
    ``outlier_factor`` more; K gets a per-channel offset of typical size ``k_offset``
    shared by all tokens (the structure SageAttention's smoothing removes); V gets a
    per-channel mean of typical size ``v_mean``.

    Returns:
        ``(q, k, v)``, float32, each of shape ``(batch, heads, seq_len, head_dim)``.
    """
    if dist not in ("normal", "student_t"):
        raise ValueError(f"dist must be 'normal' or 'student_t', got {dist!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive int, got {df!r}")
    if not 0 <= q_outliers <= head_dim:
        raise ValueError(f"q_outliers must be in [0, head_dim={head_dim}], got {q_outliers}")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)

    def draw() -> torch.Tensor:
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if dist == "normal":
            return z
        # Student-t: z / sqrt(chi2_df / df), chi2_df a sum of df squared normals
        chi2 = (torch.randn((*shape, df), generator=gen, dtype=torch.float64) ** 2).sum(-1)
        return z / (chi2 / df).sqrt()

    q, k, v = draw() * q_scale, draw(), draw()
    if q_outliers:
        idx = torch.randperm(head_dim, generator=gen)[:q_outliers]
        q[..., idx] *= outlier_factor
    if k_offset:
        k = k + k_offset * torch.randn(
            (batch, heads, 1, head_dim), generator=gen, dtype=torch.float64
        )
    if v_mean:
        v = v + v_mean * torch.randn(
            (batch, heads, 1, head_dim), generator=gen, dtype=torch.float64
        )
    return q.float(), k.float(), v.float()
