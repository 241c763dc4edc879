"""PyTorch custom ops wrapping the Triton flash-attention kernels.

``adaattn::flash_attention(q, k, v, mask, causal_mode, scale) -> (out, lse)`` and its backward
``adaattn::flash_attention_backward`` are registered with :func:`torch.library.custom_op`, with
fake (meta) implementations and an autograd formula, so the kernels run inside
``torch.compile(fullgraph=True)`` without graph breaks and pass :func:`torch.library.opcheck`.

The schema uses plain types: ``mask`` is ``Tensor?`` (bool or floating, any shape broadcastable
to ``(B, Hq, Sq, Sk)``), ``causal_mode`` is an ``int`` (0 none, 1 top-left, 2 bottom-right, the
``CAUSAL_*`` codes of :mod:`adaattn_kernels._validation`), ``scale`` a ``float``. Inputs are
assumed validated by :func:`adaattn_kernels.attention`.
"""

# No `from __future__ import annotations` here: custom_op infers the schema from annotations.
from typing import Any, Optional

import torch

from adaattn_kernels._validation import (
    CAUSAL_NONE,
    AttentionShape,
    causal_offset,
    expand_mask,
)

__all__ = ["flash_attention_backward_op", "flash_attention_op"]

_LOG2E = 1.4426950408889634


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(
    mask: Optional[torch.Tensor], shape: AttentionShape, dummy: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """Kernel view of the mask: (tensor, 4 strides, MASK_KIND)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), 0
    kind = 1 if mask.dtype == torch.bool else 2
    if kind == 1:
        mask = mask.view(torch.uint8)  # same bytes; Triton reads nonzero as "may attend"
    full = expand_mask(mask, shape)
    strides = tuple(full.stride())
    return full, (strides[0], strides[1], strides[2], strides[3]), kind


def _shape(q: torch.Tensor, k: torch.Tensor) -> AttentionShape:
    b, hq, sq, d = q.shape
    return AttentionShape(b, hq, k.shape[1], sq, k.shape[2], d)


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _run_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from adaattn_kernels.flash._triton_kernels import _fwd_kernel, seq_bucket

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    shp = _shape(q, k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((shp.batch, shp.heads_q, shp.seq_q), dtype=torch.float32, device=q.device)
    m, ms, kind = _mask_args(mask, shp, q)
    grid = lambda meta: (  # noqa: E731
        triton_cdiv(shp.seq_q, meta["BLOCK_M"]),
        shp.batch * shp.heads_q,
    )
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _fwd_kernel[grid](
            q, k, v, m, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *ms,
            out.stride(0), out.stride(1), out.stride(2),
            shp.heads_q, shp.group, shp.seq_q, shp.seq_k,
            causal_offset(causal_mode, shp.seq_q, shp.seq_k), scale * _LOG2E,
            seq_bucket(shp.seq_q), seq_bucket(shp.seq_k),
            HEAD_DIM=shp.head_dim, BLOCK_D=_block_d(shp.head_dim),
            CAUSAL=causal_mode != CAUSAL_NONE, MASK_KIND=kind,
        )  # fmt: skip
    return out, lse


def _run_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from adaattn_kernels.flash._triton_kernels import (
        _bwd_delta_kernel,
        _bwd_dkdv_kernel,
        _bwd_dq_kernel,
        seq_bucket,
    )

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = _last_dim_contiguous(out)
    do = do.contiguous() if do.stride(-1) != 1 or 0 in do.stride() else do
    lse = lse.contiguous()
    shp = _shape(q, k)
    bd = _block_d(shp.head_dim)
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse_t = dlse.contiguous().float() if dlse is not None else lse
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    m, ms, kind = _mask_args(mask, shp, q)
    diag = causal_offset(causal_mode, shp.seq_q, shp.seq_k)
    causal = causal_mode != CAUSAL_NONE
    buckets = (seq_bucket(shp.seq_q), seq_bucket(shp.seq_k))
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        block = 64 if bd <= 128 else 32
        _bwd_delta_kernel[(triton_cdiv(shp.seq_q, block), shp.batch * shp.heads_q)](
            out, do, dlse_t, delta,
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            shp.heads_q, shp.seq_q,
            HEAD_DIM=shp.head_dim, BLOCK_D=bd, HAS_DLSE=has_dlse, BLOCK_M=block,
        )  # fmt: skip
        grid_kv = lambda meta: (  # noqa: E731
            triton_cdiv(shp.seq_k, meta["BLOCK_N"]),
            shp.batch * shp.heads_kv,
        )
        _bwd_dkdv_kernel[grid_kv](
            q, k, v, m, do, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *ms,
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            shp.heads_q, shp.heads_kv, shp.group, shp.seq_q, shp.seq_k, diag,
            scale * _LOG2E, scale, *buckets,
            HEAD_DIM=shp.head_dim, BLOCK_D=bd, CAUSAL=causal, MASK_KIND=kind,
        )  # fmt: skip
        grid_q = lambda meta: (  # noqa: E731
            triton_cdiv(shp.seq_q, meta["BLOCK_M"]),
            shp.batch * shp.heads_q,
        )
        _bwd_dq_kernel[grid_q](
            q, k, v, m, do, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *ms,
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            shp.heads_q, shp.group, shp.seq_q, shp.seq_k, diag,
            scale * _LOG2E, scale, *buckets,
            HEAD_DIM=shp.head_dim, BLOCK_D=bd, CAUSAL=causal, MASK_KIND=kind,
        )  # fmt: skip
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.library.custom_op("adaattn::flash_attention", mutates_args=())
def flash_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference)
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward; returns ``(out, lse)`` with ``lse`` float32 natural log."""
    return _run_forward(q, k, v, mask, causal_mode, scale)


@flash_attention_op.register_fake
def _flash_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],  # noqa: UP045
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("adaattn::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],  # noqa: UP045
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward; returns ``(dq, dk, dv)`` (dk/dv summed over each GQA group)."""
    return _run_backward(do, q, k, v, mask, out, lse, dlse, causal_mode, scale)


@flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],  # noqa: UP045
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    q, k, v, mask, causal_mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.causal_mode = causal_mode
    ctx.scale = scale


def _backward(
    ctx: Any, dout: Optional[torch.Tensor], dlse: Optional[torch.Tensor]  # noqa: UP045
) -> tuple[Optional[torch.Tensor], ...]:  # noqa: UP045
    q, k, v, mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flash_attention_backward_op(
        dout, q, k, v, mask, out, lse, dlse, ctx.causal_mode, ctx.scale
    )
    return dq, dk, dv, None, None, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)
