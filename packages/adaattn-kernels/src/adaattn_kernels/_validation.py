"""Argument checks shared by every attention entry point of ``adaattn_kernels``.

All helpers raise ``ValueError`` / ``TypeError`` whose message names the offending argument and
says how to fix it. They are used by the dense flash path and by the FP8 and hybrid subpackages,
so they only depend on ``torch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch

__all__ = [
    "CAUSAL_BOTTOM_RIGHT",
    "CAUSAL_NONE",
    "CAUSAL_TOP_LEFT",
    "AttentionShape",
    "CausalArg",
    "causal_offset",
    "check_attention_inputs",
    "check_mask",
    "expand_mask",
    "normalize_causal",
    "resolve_scale",
]

CausalArg = Union[bool, Literal["top_left", "bottom_right"]]  # noqa: UP007 (runtime alias, py3.10)

# Integer codes for the causal convention, used in custom-op schemas (which take plain types).
CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1
CAUSAL_BOTTOM_RIGHT = 2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention problem, as read off validated ``q``, ``k``, ``v``.

    Attributes:
        batch: Batch size ``B``.
        heads_q: Query heads ``Hq``.
        heads_kv: Key/value heads ``Hkv`` (``Hq % Hkv == 0``).
        seq_q: Query length ``Sq``.
        seq_k: Key/value length ``Sk``.
        head_dim: Head dimension ``D``.
    """

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (``Hq // Hkv``)."""
        return self.heads_q // self.heads_kv


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    allowed_dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES,
) -> AttentionShape:
    """Validate ``q`` (B, Hq, Sq, D) and ``k``, ``v`` (B, Hkv, Sk, D) and return their sizes.

    Raises:
        TypeError: an input is not a tensor or has a dtype outside ``allowed_dtypes``.
        ValueError: wrong rank, mismatched batch/head/length/head-dim sizes, ``Hq % Hkv != 0``,
            empty tensors, different devices or dtypes.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"`{name}` must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}; "
                "for 3-D inputs add a batch dimension with `.unsqueeze(0)`"
            )
        if t.numel() == 0:
            raise ValueError(
                f"`{name}` is empty (shape {tuple(t.shape)}); every dimension must be ≥ 1"
            )
        if t.dtype not in allowed_dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise TypeError(f"`{name}` has dtype {t.dtype}; supported dtypes are {allowed}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them with `.to(q.dtype)`"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}; "
            "move them with `.to(q.device)`"
        )
    b, hq, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"`v` must have the shape of `k` {tuple(k.shape)}, got {tuple(v.shape)} "
            "(value head_dim different from key head_dim is not supported)"
        )
    if bk != b:
        raise ValueError(f"`k`/`v` batch size {bk} differs from `q` batch size {b}")
    if dk != d:
        raise ValueError(f"`k`/`v` head_dim {dk} differs from `q` head_dim {d}")
    if hq % hkv != 0:
        raise ValueError(
            f"`q` has {hq} heads, which is not a multiple of the {hkv} heads of `k`/`v`; "
            "grouped-query attention needs Hq % Hkv == 0"
        )
    return AttentionShape(b, hq, hkv, sq, sk, d)


def normalize_causal(causal: CausalArg) -> int:
    """Map the public ``causal`` argument to a ``CAUSAL_*`` integer code.

    ``True`` means bottom-right alignment (FlashAttention's convention: query ``i`` attends keys
    ``j ≤ i + Sk − Sq``); ``"top_left"`` is ``torch.nn.functional.scaled_dot_product_attention``'s
    ``is_causal=True`` (keys ``j ≤ i``). Both coincide when ``Sq == Sk``.

    Raises:
        ValueError: ``causal`` is none of ``False``, ``True``, ``"top_left"``, ``"bottom_right"``.
    """
    if causal is False:
        return CAUSAL_NONE
    if causal is True or causal == "bottom_right":
        return CAUSAL_BOTTOM_RIGHT
    if causal == "top_left":
        return CAUSAL_TOP_LEFT
    raise ValueError(f"`causal` must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def causal_offset(mode: int, seq_q: int, seq_k: int) -> int:
    """Diagonal offset ``o``: in causal ``mode`` query ``i`` sees key ``j`` iff ``j ≤ i + o``."""
    if mode == CAUSAL_BOTTOM_RIGHT:
        return seq_k - seq_q
    return 0


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` if given (finite, > 0), else ``1/sqrt(head_dim)``.

    Raises:
        TypeError: ``scale`` is not a real number.
        ValueError: ``scale`` is not finite or not positive.
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"`scale` must be a finite positive number, got {scale}")
    return scale


def check_mask(attn_mask: torch.Tensor | None, shape: AttentionShape, device: torch.device) -> None:
    """Validate an attention mask against the problem ``shape``.

    The mask is boolean (``True`` = may attend, the SDPA meaning) or floating point (added to the
    scaled scores; ``-inf`` forbids), and must broadcast to ``(B, Hq, Sq, Sk)``.

    Raises:
        TypeError: not a tensor, or an integer / complex dtype.
        ValueError: wrong device, more than 4 dims, or not broadcastable.
    """
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"`attn_mask` must be a torch.Tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(
            f"`attn_mask` has dtype {attn_mask.dtype}; pass a bool mask (True = may attend) or a "
            "floating-point additive mask"
        )
    if attn_mask.device != device:
        raise ValueError(
            f"`attn_mask` is on {attn_mask.device} but `q` is on {device}; move it with "
            "`.to(q.device)`"
        )
    target = (shape.batch, shape.heads_q, shape.seq_q, shape.seq_k)
    if attn_mask.dim() > 4:
        raise ValueError(
            f"`attn_mask` must have at most 4 dims, got shape {tuple(attn_mask.shape)}"
        )
    padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    for got, want in zip(padded, target):
        if got not in (1, want):
            raise ValueError(
                f"`attn_mask` of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(B, Hq, Sq, Sk) = {target}"
            )


def expand_mask(attn_mask: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """View ``attn_mask`` as ``(B, Hq, Sq, Sk)`` without copying (stride 0 on broadcast dims)."""
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(shape.batch, shape.heads_q, shape.seq_q, shape.seq_k)
