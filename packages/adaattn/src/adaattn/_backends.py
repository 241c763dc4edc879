"""The one place where :mod:`adaattn` calls its sibling packages.

``adaattn_kernels`` (dense, FP8 and hybrid attention), ``adaattn_linalg`` (entropy, effective
rank) and ``adaattn_precision`` (policies, device capability, tensor statistics and the FP8
error model) are developed and versioned separately; everything :mod:`adaattn` needs from them
goes through the small functions below, so an API change there is absorbed here.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from adaattn_precision import (
    DeviceCapability,
    FP8Config,
    PrecisionPolicy,
    detect,
    get_active_policy,
    predict_attention_error,
    tensor_stats,
)

from adaattn.exceptions import AdaAttnFallbackWarning

__all__ = [
    "DeviceCapability",
    "FP8Config",
    "PrecisionPolicy",
    "capability",
    "dense_attention",
    "effective_rank",
    "fp8_attention",
    "fp8_measured_error",
    "fp8_predicted_error",
    "get_active_policy",
    "hybrid_attention",
    "hybrid_measured_error",
    "hybrid_plan",
    "hybrid_prediction",
    "sample_rows",
    "sampled_entropy",
]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Exact attention of a 4-D problem; ``causal`` is SDPA's top-left convention.

    On CUDA, inputs the Triton kernel does not take (float32, an unsupported head_dim, ...) run
    the PyTorch reference instead — correct, but slower — and say so with an
    :class:`~adaattn.exceptions.AdaAttnFallbackWarning`.
    """
    from adaattn_kernels import attention

    mode: Literal["top_left"] | bool = "top_left" if causal else False
    if q.is_cuda:
        try:
            out = attention(
                q, k, v, attn_mask=attn_mask, causal=mode, scale=scale, backend="triton"
            )
        except ValueError as exc:  # unsupported by the Triton path; bad inputs raise again below
            warnings.warn(
                f"exact attention on {q.device} runs the PyTorch reference: {exc}",
                AdaAttnFallbackWarning,
                stacklevel=3,
            )
            out = attention(
                q, k, v, attn_mask=attn_mask, causal=mode, scale=scale, backend="reference"
            )
    else:
        out = attention(q, k, v, attn_mask=attn_mask, causal=mode, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out


def capability(device: torch.device) -> DeviceCapability:
    """What ``device`` runs natively (``adaattn_precision.detect``)."""
    return detect(device)


def sample_rows(
    seq_q: int, num: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Stratified sample of query rows (the kernels' estimator sampling)."""
    from adaattn_kernels.hybrid import sample_query_rows

    return sample_query_rows(seq_q, num, generator=generator, device=device)


def sampled_entropy(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, num_samples: int, seed: int
) -> torch.Tensor:
    """Mean normalised row entropy per (batch, head) from sampled rows, ``(B, H)``."""
    from adaattn_linalg import sampled_entropy as _sampled

    res = _sampled(
        q,
        k,
        num_samples=num_samples,
        scale=scale,
        causal="top_left" if causal else False,
        normalize=True,
        seed=seed,
    )
    return res.mean


def effective_rank(a: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli effective rank of each matrix of a batch ``(..., m, n)``."""
    from adaattn_linalg import effective_rank as _erank

    return _erank(a)


def fp8_predicted_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, fp8: FP8Config
) -> torch.Tensor:
    """The precision package's model of the FP8 output error per (batch, head), ``(B, H)``."""
    return predict_attention_error(
        tensor_stats(q, name="q"),
        tensor_stats(k, name="k"),
        tensor_stats(v, name="v"),
        precision=fp8.precision,
        scale=scale,
        fp8=fp8,
    )


#: Operand formats of the 8-bit attention path, as run and as measured: ``Q·Kᵀ`` in int8
#: (SageAttention's choice, the kernels' default) and ``P·V`` in FP8 e4m3.
FP8_QK_DTYPE = "int8"
#: How plans name the precision of 8-bit heads (``Q·Kᵀ`` / ``P·V`` formats).
FP8_PRECISION_LABEL = "int8/fp8_e4m3"


def fp8_recipe_unsupported(fp8: FP8Config) -> str:
    """The parts of ``fp8`` the FP8 attention kernel cannot honour, as text ("" if none)."""
    from adaattn_kernels.fp8 import MAX_BLOCK_SIZE

    parts = []
    if fp8.margin != 0:
        parts.append(f"margin={fp8.margin}")
    if fp8.pow2_scales:
        parts.append("pow2_scales=True")
    if not fp8.smooth_k:
        parts.append("smooth_k=False")
    if fp8.granularity != "tensor" and fp8.block_size > MAX_BLOCK_SIZE:
        parts.append(f"block_size={fp8.block_size} (> {MAX_BLOCK_SIZE})")
    return ", ".join(parts)


def _fp8_options(fp8: FP8Config) -> dict[str, Any]:
    from adaattn_kernels.fp8 import MAX_BLOCK_SIZE

    # The same options for the measurement and the run, so the estimate is of what runs.
    # The kernel scales per block or per token; a per-tensor recipe maps to the largest block.
    if fp8.granularity == "token":
        out: dict[str, Any] = {"granularity": "token", "block_size": fp8.block_size}
    elif fp8.granularity == "tensor":
        out = {"granularity": "block", "block_size": MAX_BLOCK_SIZE}
    else:
        out = {"granularity": "block", "block_size": fp8.block_size}
    out["qk_dtype"] = FP8_QK_DTYPE
    return out


def fp8_measured_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    fp8: FP8Config,
    confidence: float | None = None,
) -> torch.Tensor:
    """Measured FP8 output error on the sampled ``rows`` per (batch, head), ``(B, H)``."""
    from adaattn_kernels.fp8 import fp8_attention_error

    return fp8_attention_error(
        q,
        k,
        v,
        rows=rows,
        causal="top_left" if causal else False,
        scale=scale,
        confidence=confidence,
        **_fp8_options(fp8),
    )


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, fp8: FP8Config
) -> torch.Tensor:
    """FP8 attention forward (Triton on FP8 GPUs, float8 simulation on CPU)."""
    from adaattn_kernels.fp8 import fp8_attention as _fp8

    out = _fp8(q, k, v, causal="top_left" if causal else False, scale=scale, **_fp8_options(fp8))
    assert isinstance(out, torch.Tensor)
    return out


def hybrid_plan(
    batch: int,
    heads: int,
    *,
    seq_k: int,
    window: torch.Tensor,
    rank: torch.Tensor,
    sinks: int,
    exact: torch.Tensor,
    device: torch.device,
) -> Any:
    """A ``HybridPlan`` from per-head ``window``/``rank``/``exact`` tensors ``(heads,)``."""
    from adaattn_kernels.hybrid import HybridPlan

    return HybridPlan.build(
        batch,
        heads,
        seq_len_k=seq_k,
        window=window.to(device)[None, :],
        rank=rank.to(device)[None, :].clamp_min(1),
        sinks=sinks,
        exact=exact.to(device)[None, :],
        device=device,
    )


def hybrid_prediction(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    windows: tuple[int, ...],
    ranks: tuple[int, ...],
    sinks: int,
    causal: bool,
    scale: float,
    num_samples: int,
    generator: torch.Generator,
) -> Any:
    """The kernels' cheap error predictor over a ``windows × ranks`` grid."""
    from adaattn_kernels.hybrid import predict_hybrid_error

    return predict_hybrid_error(
        q,
        k,
        v,
        windows=windows,
        ranks=ranks,
        sinks=sinks,
        causal="top_left" if causal else False,
        scale=scale,
        num_samples=num_samples,
        generator=generator,
    )


def hybrid_measured_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Any,
    *,
    causal: bool,
    scale: float,
    num_samples: int,
    generator: torch.Generator,
    confidence: float | None = None,
) -> torch.Tensor:
    """Measured error of a hybrid plan on sampled rows per (batch, head), ``(B, H)``."""
    from adaattn_kernels.hybrid import estimate_hybrid_error

    return estimate_hybrid_error(
        q,
        k,
        v,
        plan,
        causal="top_left" if causal else False,
        scale=scale,
        num_samples=num_samples,
        generator=generator,
        confidence=confidence,
    )


def hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, *, causal: bool, scale: float
) -> torch.Tensor:
    """Mixed exact/hybrid attention in one launch."""
    from adaattn_kernels.hybrid import hybrid_attention as _hybrid

    out = _hybrid(q, k, v, plan, causal="top_left" if causal else False, scale=scale)
    assert isinstance(out, torch.Tensor)
    return out
