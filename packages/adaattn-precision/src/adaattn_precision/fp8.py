"""FP8 scaling: the quantisation contract the FP8 attention kernels implement.

For an input ``x`` of shape ``(..., S, D)`` (``S`` tokens, ``D`` channels) and a scaling
group ``G`` (the whole ``(S, D)`` matrix, a block of ``block_size`` consecutive tokens, or
one token), with ``fmax = fp8_max(fmt)``:

.. code-block:: text

    amax_G  = max_{(s, d) in G} |x[..., s, d]|               (computed in float32)
    c       = float32(2**margin / fmax)                       (a rounded constant)
    scale_G = amax_G * c                      if amax_G > 0, else 1
    scale_G = max(scale_G, float32 tiny)                      (no zero scale)
    scale_G = 2**ceil(log2(scale_G))          if pow2_scales  (exact, via frexp)
    xq      = clamp(x.float() / scale_G, -fmax, fmax).to(float8)  (round to nearest even)
    x      ~= xq.float() * scale_G

This is the per-block scaling of Transformer Engine / DeepSeek-V3 ("fine-grained
quantization", DeepSeek-AI 2024, Sec. 3.3.2) applied along the sequence dimension, as in
SageAttention (Zhang et al. 2024, Sec. 3.3, per-block Q/K quantisation). To be
bit-identical, kernels compute the scale as the float32 product ``amax * c`` and quantise
with an IEEE-rounded division ``x / scale`` (in Triton ``tl.math.div_rn``; the default
``/`` is approximate) — not a multiplication by a rounded reciprocal. With
``pow2_scales=True`` division and reciprocal multiplication are both exact. The CUDA and
CPU paths of this function agree bit for bit.

Scale shapes (``float32``; leading dims ``...`` are kept):

* ``"tensor"``: ``(...)`` — one scale per leading index, i.e. per (batch, head) matrix; a
  2-D input gives a 0-d scale.
* ``"block"``: ``(..., ceil(S / block_size))`` — block ``b`` covers tokens
  ``[b * block_size, min((b + 1) * block_size, S))``; the last block may be partial.
* ``"token"``: ``(..., S)``.

Rounding error: for e4m3 (3 mantissa bits), every value in the normal range of the scaled
format is rounded with relative error <= 2**-4; values below the smallest normal
(2**-6 * scale) have absolute error <= 2**-10 * scale. For e5m2 the bounds are 2**-3 and
2**-17 * scale.
"""

from __future__ import annotations

import math

import torch

from .policy import FP8_FORMATS, GRANULARITIES

__all__ = [
    "FP8_DTYPES",
    "dequantize_fp8",
    "expand_scale",
    "fp8_format_info",
    "fp8_max",
    "quantize_fp8",
]

#: torch dtypes of the FP8 formats.
FP8_DTYPES: dict[str, torch.dtype] = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}

# (mantissa bits, smallest normal exponent) of each format.
_FORMAT_BITS: dict[str, tuple[int, int]] = {"e4m3": (3, -6), "e5m2": (2, -14)}


def _check_fmt(fmt: str) -> None:
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {list(FP8_FORMATS)}, got {fmt!r}")


def fp8_max(fmt: str = "e4m3") -> float:
    """Largest finite value of an FP8 format: 448 for e4m3, 57344 for e5m2.

    Raises:
        ValueError: If ``fmt`` is not ``"e4m3"`` or ``"e5m2"``.
    """
    _check_fmt(fmt)
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


def fp8_format_info(fmt: str = "e4m3") -> dict[str, float]:
    """Rounding parameters of an FP8 format.

    Returns:
        ``max`` (largest finite), ``mantissa_bits``, ``min_normal`` (2**emin),
        ``subnormal_step`` (2**(emin - mantissa_bits)) and ``unit_roundoff``
        (2**-(mantissa_bits + 1): the bound on relative rounding error of normal values).
    """
    _check_fmt(fmt)
    mbits, emin = _FORMAT_BITS[fmt]
    return {
        "max": fp8_max(fmt),
        "mantissa_bits": float(mbits),
        "min_normal": 2.0**emin,
        "subnormal_step": 2.0 ** (emin - mbits),
        "unit_roundoff": 2.0 ** -(mbits + 1),
    }


def _check_options(granularity: str, block_size: int, margin: int, pow2_scales: bool) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if isinstance(margin, bool) or not isinstance(margin, int):
        raise TypeError(f"margin must be an int, got {type(margin).__name__}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not isinstance(pow2_scales, bool):
        raise TypeError(f"pow2_scales must be a bool, got {type(pow2_scales).__name__}")


def _group_amax(x: torch.Tensor, granularity: str, block_size: int) -> torch.Tensor:
    """Per-group max |x| in float32 with the documented scale shape."""
    a = x.detach().abs().to(torch.float32)
    if granularity == "tensor":
        return a.amax(dim=(-2, -1))
    if granularity == "token":
        return a.amax(dim=-1)
    s = a.shape[-2]
    nblocks = math.ceil(s / block_size)
    pad = nblocks * block_size - s
    tok = a.amax(dim=-1)  # (..., S)
    if pad:
        tok = torch.nn.functional.pad(tok, (0, pad))  # |x| >= 0, so zero padding is neutral
    return tok.reshape(*tok.shape[:-1], nblocks, block_size).amax(dim=-1)


def expand_scale(
    scale: torch.Tensor, shape: torch.Size | tuple[int, ...], *, granularity: str, block_size: int
) -> torch.Tensor:
    """Broadcast a scale of the documented shape to a tensor of shape ``(..., S, 1)``.

    Args:
        scale: Scale from :func:`quantize_fp8`.
        shape: Shape ``(..., S, D)`` of the quantised tensor.
        granularity: Granularity used to compute ``scale``.
        block_size: Block size used to compute ``scale`` (``"block"`` only).

    Returns:
        A tensor that broadcasts against ``(..., S, D)``.
    """
    s = shape[-2]
    if granularity == "tensor":
        return scale[..., None, None]
    if granularity == "token":
        return scale[..., None]
    return scale.repeat_interleave(block_size, dim=-1)[..., :s, None]


def quantize_fp8(
    x: torch.Tensor,
    *,
    fmt: str = "e4m3",
    granularity: str = "block",
    block_size: int = 128,
    margin: int = 0,
    pow2_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` of shape ``(..., S, D)`` to FP8 with per-group float32 scales.

    See the module docstring for the exact formula and scale shapes; in short,
    ``x ≈ xq.float() * expand_scale(scale, x.shape, ...)``. Quantisation saturates (values
    are clamped to ±``fp8_max(fmt)``, never inf/NaN) and an all-zero group gets scale 1.

    Args:
        x: Floating-point tensor with at least 2 dims, no NaN/Inf, non-empty.
        fmt: ``"e4m3"`` (``torch.float8_e4m3fn``) or ``"e5m2"`` (``torch.float8_e5m2``).
        granularity: ``"block"`` (``block_size`` tokens along dim -2), ``"token"`` or
            ``"tensor"`` (one scale per ``(S, D)`` matrix).
        block_size: Tokens per block for ``"block"``; ignored otherwise.
        margin: Non-negative head-room exponent; the group maximum maps to
            ``fp8_max / 2**margin``.
        pow2_scales: Round scales up to powers of two.

    Returns:
        ``(xq, scale)``: ``xq`` has ``x``'s shape and the FP8 dtype; ``scale`` is float32.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` has fewer than 2 dims, is empty or holds NaN/Inf, or an option
            is invalid.
    """
    _check_fmt(fmt)
    _check_options(granularity, block_size, margin, pow2_scales)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in FP8_DTYPES.values():
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (..., S, D) with at least 2 dims, got {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; FP8 quantisation needs finite inputs")
    fmax = fp8_max(fmt)
    amax = _group_amax(x, granularity, block_size)
    # Multiply by a float32 constant (not divide by fmax): CUDA implements division by a
    # scalar as multiplication by its reciprocal, so only this form is bit-identical.
    inv_target = torch.tensor(2.0**margin / fmax, dtype=torch.float32, device=amax.device)
    scale = torch.where(amax > 0, amax * inv_target, torch.ones_like(amax))
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    if pow2_scales:
        # Round up to a power of two exactly: scale = m * 2**e with m in [0.5, 1).
        mant, expo = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mant == 0.5, expo - 1, expo))
    xs = x.to(torch.float32) / expand_scale(
        scale, x.shape, granularity=granularity, block_size=block_size
    )
    xq = xs.clamp(-fmax, fmax).to(FP8_DTYPES[fmt])
    return xq, scale


def dequantize_fp8(
    xq: torch.Tensor,
    scale: torch.Tensor,
    *,
    granularity: str = "block",
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Invert :func:`quantize_fp8`: ``xq.float() * scale`` broadcast per group.

    Args:
        xq: FP8 tensor of shape ``(..., S, D)``.
        scale: float32 scale of the shape documented for ``granularity``.
        granularity: Granularity used when quantising.
        block_size: Block size used when quantising (``"block"`` only).
        dtype: Floating dtype of the result (the product is formed in float32, or in
            float64 when ``dtype`` is float64).

    Returns:
        The dequantised tensor.

    Raises:
        TypeError: If ``xq`` is not FP8 or ``scale`` is not floating point.
        ValueError: If ``scale`` does not have the shape implied by ``xq`` and the options.
    """
    _check_options(granularity, block_size, 0, False)
    if not isinstance(xq, torch.Tensor) or xq.dtype not in FP8_DTYPES.values():
        got = xq.dtype if isinstance(xq, torch.Tensor) else type(xq).__name__
        raise TypeError(f"xq must be a float8_e4m3fn or float8_e5m2 tensor, got {got}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError("scale must be a floating-point torch.Tensor")
    if xq.dim() < 2:
        raise ValueError(f"xq must have shape (..., S, D), got {tuple(xq.shape)}")
    lead, s = tuple(xq.shape[:-2]), xq.shape[-2]
    expected = {
        "tensor": lead,
        "token": (*lead, s),
        "block": (*lead, math.ceil(s / block_size)),
    }[granularity]
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)} but granularity={granularity!r} "
            f"(block_size={block_size}) and xq of shape {tuple(xq.shape)} need {expected}"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = xq.to(work) * expand_scale(
        scale.to(work), xq.shape, granularity=granularity, block_size=block_size
    )
    return out.to(dtype)
