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
import os
from typing import Any, Optional

import torch

from adaattn_kernels._triton import device_ctx
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
    mask: torch.Tensor | None, shape: AttentionShape, dummy: torch.Tensor
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


def _use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> bool:
    """Whether the forward streams K/V tiles through host-side TMA descriptors (opt-in).

    ``ADAATTN_FLASH_TMA=1`` enables it on Hopper and newer. Off by default: on an H200 with
    Triton 3.6 it measured 1–8 % slower than the cp.async pointer path (tools/bench/tune_flash.py).
    """
    if os.environ.get("ADAATTN_FLASH_TMA", "0") != "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9 or _block_d(head_dim) != head_dim:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # pragma: no cover - triton < 3.4
        return False
    # The descriptors view K and V as (B·Hkv·Sk, D) row-major matrices.
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (k, v))


_EXP2_MODES = {"mufu": 0, "split": 1, "poly": 2, "quarter": 3}


def _exp2_mode() -> int:
    """How the forward computes ``exp2`` of unmasked tiles: ``ADAATTN_FLASH_EXP2``.

    ``mufu`` (default): the special-function unit. ``split``: half the columns by a polynomial
    on the FMA pipes (FlashAttention-4's trick); ``quarter``: a quarter of them. ``poly``: all
    of them by the polynomial.
    """
    name = os.environ.get("ADAATTN_FLASH_EXP2", "mufu")
    if name not in _EXP2_MODES:
        raise ValueError(f"ADAATTN_FLASH_EXP2={name!r}: expected one of {sorted(_EXP2_MODES)}")
    return _EXP2_MODES[name]


def forward_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal_mode: int,
    scale: float,
    *,
    use_tma: bool | None = None,
    head_idx: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor, torch.Tensor]:
    """Positional args, constexpr kwargs and outputs of one ``_fwd_kernel`` launch.

    Shared by the op and by ``tools/bench/tune_flash.py`` (which launches the un-tuned kernel
    with explicit tile sizes). ``q``, ``k``, ``v`` must have a contiguous last dimension.
    ``head_idx`` (int32, flattened ``b·H + h``) restricts the launch to those heads, writing into
    the given ``out`` / ``lse`` (allocated here when ``None``); the grid's second dimension is then
    ``len(head_idx)``.
    """
    from adaattn_kernels.flash._triton_kernels import seq_bucket

    shp = _shape(q, k)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((shp.batch, shp.heads_q, shp.seq_q), dtype=torch.float32, device=q.device)
    m, ms, kind = _mask_args(mask, shp, q)
    tma = _use_tma(q, k, v, shp.head_dim) if use_tma is None else use_tma
    desc_k: Any = k
    desc_v: Any = v
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        d = shp.head_dim
        rows = shp.batch * shp.heads_kv * shp.seq_k
        desc_k = TensorDescriptor(k.view(rows, d), [rows, d], [d, 1], [64, d])
        desc_v = TensorDescriptor(v.view(rows, d), [rows, d], [d, 1], [64, d])
    args = (
        q, k, v, m, out, lse, lse if head_idx is None else head_idx, desc_k, desc_v,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *ms,
        out.stride(0), out.stride(1), out.stride(2),
        shp.heads_q, shp.group, shp.seq_q, shp.seq_k,
        causal_offset(causal_mode, shp.seq_q, shp.seq_k), scale * _LOG2E,
        seq_bucket(shp.seq_q), seq_bucket(shp.seq_k),
    )  # fmt: skip
    kwargs = {
        "HEAD_DIM": shp.head_dim,
        "BLOCK_D": _block_d(shp.head_dim),
        "CAUSAL": causal_mode != CAUSAL_NONE,
        "MASK_KIND": kind,
        "USE_TMA": tma,
        "EXP2_MODE": _exp2_mode(),
        "HEAD_LIST": head_idx is not None,
    }
    return args, kwargs, out, lse


def _run_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal_mode: int,
    scale: float,
    *,
    head_idx: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense forward launch; ``head_idx`` / ``out`` / ``lse`` as in :func:`forward_launch`."""
    from adaattn_kernels.flash._triton_kernels import launch_fwd

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    args, kwargs, out, lse = forward_launch(
        q, k, v, mask, causal_mode, scale, head_idx=head_idx, out=out, lse=lse
    )
    batch_heads = q.shape[0] * q.shape[1] if head_idx is None else head_idx.numel()
    grid = lambda meta: (triton_cdiv(q.shape[2], meta["BLOCK_M"]), batch_heads)
    with device_ctx(q):
        launch_fwd(grid, *args, **kwargs)
    return out, lse


def _run_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    causal_mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from adaattn_kernels.flash._triton_kernels import (
        launch_bwd_delta,
        launch_bwd_dkdv,
        launch_bwd_dq,
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
    with device_ctx(q):
        block = 64 if bd <= 128 else 32
        launch_bwd_delta(
            (triton_cdiv(shp.seq_q, block), shp.batch * shp.heads_q),
            out, do, dlse_t, delta,
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            shp.heads_q, shp.seq_q,
            HEAD_DIM=shp.head_dim, BLOCK_D=bd, HAS_DLSE=has_dlse, BLOCK_M=block,
        )  # fmt: skip
        grid_kv = lambda meta: (triton_cdiv(shp.seq_k, meta["BLOCK_N"]), shp.batch * shp.heads_kv)
        launch_bwd_dkdv(
            grid_kv,
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
        grid_q = lambda meta: (triton_cdiv(shp.seq_q, meta["BLOCK_M"]), shp.batch * shp.heads_q)
        launch_bwd_dq(
            grid_q,
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
    ctx: Any,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flash_attention_backward_op(
        dout, q, k, v, mask, out, lse, dlse, ctx.causal_mode, ctx.scale
    )
    return dq, dk, dv, None, None, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)
