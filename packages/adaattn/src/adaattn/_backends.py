"""The one place where :mod:`adaattn` calls its sibling packages.

``adaattn_kernels`` (dense, FP8 and hybrid attention), ``adaattn_linalg`` (entropy, effective
rank) and ``adaattn_precision`` (policies, tensor statistics, FP8 quantisation) are developed and
versioned separately; everything :mod:`adaattn` needs from them goes through the small functions
below, so an API change there is absorbed here.
"""

from __future__ import annotations

from typing import Any

import torch


def _kernels() -> Any:
    import adaattn_kernels

    return adaattn_kernels


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Exact attention of a 4-D problem; ``causal`` is SDPA's top-left convention."""
    kernels = _kernels()
    fn = getattr(kernels, "attention", None)
    if fn is None:  # package __init__ not exporting yet: use the defining module
        from adaattn_kernels.flash.api import attention as fn
    out = fn(q, k, v, attn_mask=attn_mask, causal="top_left" if causal else False, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out
