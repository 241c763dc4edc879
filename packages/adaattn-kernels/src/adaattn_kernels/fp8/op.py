"""PyTorch custom op wrapping the FP8 attention forward (quantisation + attention kernels).

``adaattn::fp8_attention(q, k, v, causal_mode, scale, pv_fp8, granularity, block_size,
qk_int8, outlier_channels=0) -> (out, lse)`` is registered with
:func:`torch.library.custom_op` and a fake (meta) implementation, so it traces under
``torch.compile(fullgraph=True)`` and passes :func:`torch.library.opcheck`. It is
forward-only (no autograd formula): FP8 attention is an inference path. ``causal_mode`` is a
``CAUSAL_*`` code of :mod:`adaattn_kernels._validation`. Inputs are assumed validated by
:func:`adaattn_kernels.fp8.fp8_attention`.
"""

# No `from __future__ import annotations` here: custom_op infers the schema from annotations.
import torch

from adaattn_kernels._triton import device_ctx, interpreting
from adaattn_kernels._validation import CAUSAL_NONE, causal_offset
from adaattn_kernels.fp8.quant import (
    _unit_last_stride,
    quantize_channels_t,
    quantize_rows,
    select_outlier_channels,
)

__all__ = ["fp8_attention_op"]


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if a TMA descriptor can address it (16-byte aligned base and strides)."""
    size = t.element_size()
    ok = t.data_ptr() % 16 == 0 and t.stride(-1) == 1
    ok = ok and all(st > 0 and (st * size) % 16 == 0 for st in t.stride()[:-1])
    return t if ok else t.contiguous()


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal_mode: int,
    scale: float,
    pv_fp8: bool,
    granularity: str,
    block_size: int,
    qk_int8: bool,
    outlier_channels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from adaattn_kernels.flash._triton_kernels import seq_bucket
    from adaattn_kernels.fp8._triton_kernels import BLOCK_N, PAD, launch_fwd

    q, k = _unit_last_stride(q), _unit_last_stride(k)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qblock = 1 if granularity in ("token", "q_token") else block_size
    kblock = 1 if granularity == "token" else block_size
    k_gran = "token" if kblock == 1 else "block"
    mu = torch.mean(k, dim=-2, dtype=torch.float32)  # (B, Hkv, D): K smoothing
    n_hi = outlier_channels
    k_src, q_src = k, q
    if n_hi:
        # Outlier channels leave the 8-bit operands: K's are set to the mean (0 once smoothed;
        # the reference does the same), Q's are zeroed in the kernel (or here, when Q is
        # quantised separately); their products come from 16-bit copies.
        hi_idx, hit = select_outlier_channels(q, k, mu, n_hi)
        k_src = torch.where(hit.unsqueeze(-2), mu.to(k.dtype).unsqueeze(-2), k)
        q_src = q.masked_fill(hit.repeat_interleave(hq // hkv, dim=1).unsqueeze(-2), 0.0)
    k8, ks = quantize_rows(
        k_src, granularity=k_gran, block_size=block_size, mean=mu, pad_to=PAD, int8=qk_int8
    )
    skp = k8.shape[2]
    if n_hi:
        khi = torch.zeros((b, hkv, skp, n_hi), dtype=k.dtype, device=k.device)
        khi[:, :, :sk] = torch.gather(
            k.to(torch.float32) - mu.unsqueeze(-2), -1, hi_idx[:, :, None, :].expand(-1, -1, sk, -1)
        ).to(k.dtype)
        qhi_idx = hi_idx.to(torch.int32).contiguous()
    else:
        khi, qhi_idx = ks, ks  # unused by the kernel
    desc_k = TensorDescriptor.from_tensor(k8.view(b * hkv * skp, d), [BLOCK_N, d])
    if pv_fp8:
        v8t, vs = quantize_channels_t(v, pad_to=PAD)  # (B, Hkv, D, Sk_pad), keys contiguous
        desc_v = TensorDescriptor.from_tensor(v8t.view(b * hkv * d, skp), [d // 2, BLOCK_N])
    else:
        v16 = _tma_ready(v)
        desc_v = TensorDescriptor(v16, list(v16.shape), list(v16.stride()), [1, 1, BLOCK_N, d // 2])
        vs = mu  # unused by the kernel
    # Q is quantised inside the attention kernel when every query tile lies in one scale group
    # (every BLOCK_M divides PAD = 128); other block sizes take a separate pass.
    fuse_q = qblock == 1 or qblock % PAD == 0
    if fuse_q:
        q8, qs = k8, ks  # unused by the kernel
        n_qs = -(-sq // qblock)
    else:
        q8, qs = quantize_rows(
            q_src, granularity="block", block_size=block_size, pad_to=PAD, int8=qk_int8
        )
        n_qs = qs.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (-(-sq // meta["BLOCK_M"]), b * hq)
    with device_ctx(q):
        launch_fwd(
            grid,
            q, q8, qs, desc_k, ks, mu.contiguous(), desc_v, vs, out, lse, qhi_idx, khi,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            hq, hq // hkv, sq, sk, q8.shape[2], skp, n_qs, ks.shape[-1],
            causal_offset(causal_mode, sq, sk), scale,
            seq_bucket(sq), seq_bucket(sk),
            HEAD_DIM=d, Q_BLOCK=qblock, K_BLOCK=kblock,
            CAUSAL=causal_mode != CAUSAL_NONE, PV_FP8=pv_fp8, FUSE_Q=fuse_q, QK_INT8=qk_int8,
            ROUND_SW=interpreting(), BLOCK_N=BLOCK_N, N_HI=n_hi,
        )  # fmt: skip
    return out, lse


@torch.library.custom_op("adaattn::fp8_attention", mutates_args=())
def fp8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal_mode: int,
    scale: float,
    pv_fp8: bool,
    granularity: str,
    block_size: int,
    qk_int8: bool,
    outlier_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-precision attention forward: ``(out, lse)``, ``lse`` float32 natural log ``(B, Hq, Sq)``.

    ``qk_int8``: ``Q·Kᵀ`` in int8 (else e4m3); ``pv_fp8``: ``P·V`` in e4m3 (else 16-bit);
    ``outlier_channels``: channels of ``Q·Kᵀ`` computed in 16-bit (0, 16 or 32).
    """
    return _run(
        q, k, v, causal_mode, scale, pv_fp8, granularity, block_size, qk_int8, outlier_channels
    )


@fp8_attention_op.register_fake
def _fp8_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal_mode: int,
    scale: float,
    pv_fp8: bool,
    granularity: str,
    block_size: int,
    qk_int8: bool,
    outlier_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse
