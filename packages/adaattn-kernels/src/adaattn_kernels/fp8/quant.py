"""Fused FP8 (e4m3) and int8 quantisation in Triton, bit-exact with their contracts.

:func:`quantize_fp8_triton` is bit-exact with :func:`adaattn_precision.quantize_fp8`, and
:func:`quantize_int8_triton` with :func:`adaattn_kernels.fp8.quantize_int8` (symmetric int8,
``scale = amax/127``). For e4m3, :func:`quantize_fp8_triton` is the public entry point (same
numbers as
``adaattn_precision.quantize_fp8(x, fmt="e4m3", granularity=..., block_size=...)``; one program
per scale group reads its rows twice — maximum, then quantise, the second read from cache — and
writes the FP8 tensor once). The attention op uses the internal helpers, which also
subtract a per-channel mean on the fly (K smoothing), pad the token dimension to a multiple of
128 with zeros so that the attention kernel needs no bounds checks, and write V transposed with
per-channel scales.
"""

from __future__ import annotations

import torch

from adaattn_kernels._triton import device_ctx, interpreting, runs_triton

__all__ = ["TRITON_GRANULARITIES", "kernel_tile_n", "quantize_fp8_triton", "quantize_int8_triton"]

#: Granularities the Triton quantisation (and the FP8 attention op) implement.
TRITON_GRANULARITIES = ("block", "token")
_FP8 = torch.float8_e4m3fn
_ROWS_TOKEN = 32


def kernel_tile_n() -> int:
    """Keys per tile of the FP8 attention kernel: 128 on the GPU, 32 under the interpreter.

    The tile is fixed (not autotuned) because the running maximum at each tile boundary decides
    how the probabilities are rounded to e4m3; :func:`~adaattn_kernels.fp8.fp8_attention_reference`
    replays the same tiles.
    """
    return 32 if interpreting() else 128


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


#: Accepted numbers of outlier channels kept in 16-bit (multiples of the 16-wide MMA K-dim).
OUTLIER_CHANNELS = (0, 16, 32)


def select_outlier_channels(
    q: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` channels of each KV head whose score terms can be largest, and their mask.

    Channel ``c`` of a score is ``Σ_c q_c k̃_c``; its largest possible magnitude is
    ``amax|Q_c| · amax|K̃_c|`` (``K̃ = K − mean``, maxima over the sequence and, for Q, over the
    query heads of the GQA group). The ``n`` channels with the largest bound are computed in
    16-bit by the 8-bit attention path (LLM.int8()'s mixed-precision decomposition, Dettmers et
    al. 2022, arXiv 2208.07339, applied to ``Q·Kᵀ``): int8 then quantises the rest, whose
    scales are no longer set by the outliers. Shared by the kernel's op and the reference so
    both pick the same channels.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``.
        mean: ``(B, Hkv, D)`` float32 mean of K over the keys (the smoothing shift).
        n: Number of channels, ``0 < n < D``.

    Returns:
        ``(index, mask)``: int64 ``(B, Hkv, n)`` channel indices (ascending) and bool
        ``(B, Hkv, D)`` with ``True`` at those channels.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    q_amax = q.abs().amax(dim=-2).to(torch.float32).reshape(b, hkv, hq // hkv, d).amax(dim=2)
    k_amax = (k.to(torch.float32) - mean.unsqueeze(-2)).abs().amax(dim=-2)
    index = torch.topk(q_amax * k_amax, n, dim=-1).indices.sort(dim=-1).values
    mask = torch.zeros((b, hkv, d), dtype=torch.bool, device=q.device)
    mask.scatter_(-1, index, True)
    return index, mask


def quantize_rows(
    x: torch.Tensor,
    *,
    granularity: str,
    block_size: int,
    mean: torch.Tensor | None = None,
    pad_to: int = 1,
    int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (B, H, S, D) with scales over token blocks or tokens (validated inputs).

    Args:
        x: float16/bfloat16/float32 tensor ``(B, H, S, D)``.
        granularity: ``"block"`` or ``"token"``.
        block_size: Tokens per scale group for ``"block"``.
        mean: Optional float32 ``(B, H, D)`` subtracted from every token before quantising.
        pad_to: The token dimension of the result is padded with zeros to a multiple of this.
        int8: Symmetric int8 (``scale = amax/127``) instead of e4m3.

    Returns:
        ``(xq, scale)``: contiguous e4m3 (or int8) ``(B, H, S_pad, D)`` and float32
        ``(B, H, n_groups)``.
    """
    from adaattn_kernels.fp8._triton_kernels import launch_quant_rows

    x = _unit_last_stride(x)
    b, h, s, d = x.shape
    sp = _padded(s, pad_to)
    xq = torch.empty((b, h, sp, d), dtype=torch.int8 if int8 else _FP8, device=x.device)
    if sp > s:
        xq[:, :, s:].view(torch.uint8).zero_()
    qblock = 1 if granularity == "token" else block_size
    n_groups = -(-s // qblock)
    scale = torch.empty((b, h, n_groups), dtype=torch.float32, device=x.device)
    if mean is not None:
        mean = mean.to(torch.float32)
        mean = _unit_last_stride(mean)
    mu = mean if mean is not None else scale
    mstrides = (mean.stride(0), mean.stride(1)) if mean is not None else (0, 0)
    if qblock == 1:
        rows = _ROWS_TOKEN
        grid = (-(-s // rows), b * h)
    else:
        rows = min(32, _pow2_at_least(qblock, 1))
        grid = (n_groups, b * h)
    with device_ctx(x):
        launch_quant_rows(
            grid,
            x, mu, xq, scale,
            x.stride(0), x.stride(1), x.stride(2),
            *mstrides,
            h, s, sp, n_groups,
            HEAD_DIM=d, BLOCK_D=_pow2_at_least(d), QBLOCK=qblock, ROWS=rows,
            SMOOTH=mean is not None, ROUND_SW=True, INT8=int8, num_warps=4,
        )  # fmt: skip
    return xq, scale


def quantize_channels_t(v: torch.Tensor, *, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``v`` (B, H, S, D) per channel and return it transposed.

    Returns:
        ``(vqt, scale)``: contiguous e4m3 ``(B, H, D, S_pad)`` (keys contiguous, zero padded to a
        multiple of ``pad_to``) and float32 ``(B, H, D)`` — the numbers of
        ``quantize_fp8(v.transpose(-1, -2), granularity="token")``.
    """
    from adaattn_kernels.fp8._triton_kernels import launch_quant_channels_t

    v = _unit_last_stride(v)
    b, h, s, d = v.shape
    sp = _padded(s, pad_to)
    # max |v| per channel without materialising |v| (exact: a maximum of stored values).
    amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=-2).to(torch.float32).contiguous()
    vqt = torch.empty((b, h, d, sp), dtype=_FP8, device=v.device)
    if sp > s:
        vqt[..., s:].view(torch.uint8).zero_()
    scale = torch.empty((b, h, d), dtype=torch.float32, device=v.device)
    rows = 64
    with device_ctx(v):
        launch_quant_channels_t(
            (-(-s // rows), b * h),
            v, amax, vqt, scale,
            v.stride(0), v.stride(1), v.stride(2),
            h, s, sp,
            HEAD_DIM=d, BLOCK_D=_pow2_at_least(d), ROWS=rows, ROUND_SW=True, num_warps=4,
        )  # fmt: skip
    return vqt, scale


def _check_quant_input(
    x: torch.Tensor, granularity: str, block_size: int
) -> tuple[torch.Tensor, torch.Size]:
    """Validate the input of the public quantisation kernels; ``(x as (1, N, S, D), shape)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"`x` has dtype {x.dtype}; supported are float16, bfloat16, float32")
    if granularity not in TRITON_GRANULARITIES:
        raise ValueError(
            f"`granularity` must be one of {TRITON_GRANULARITIES}, got {granularity!r}; "
            "per-tensor scales are not implemented"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"`block_size` must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"`block_size` must be ≥ 1, got {block_size}")
    if x.dim() < 2:
        raise ValueError(f"`x` must have shape (..., S, D), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"`x` is empty (shape {tuple(x.shape)})")
    if not runs_triton(x):
        raise ValueError(
            f"`x` is on {x.device}; the Triton quantisation needs a CUDA tensor (or a CPU tensor "
            "with TRITON_INTERPRET=1); use adaattn_precision.quantize_fp8 or "
            "adaattn_kernels.fp8.quantize_int8 instead"
        )
    s, d = x.shape[-2], x.shape[-1]
    return x.reshape(1, -1, s, d), x.shape


def quantize_fp8_triton(
    x: torch.Tensor, *, granularity: str = "block", block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` of shape ``(..., S, D)`` to e4m3 with a fused Triton kernel.

    Produces exactly the tensors of ``adaattn_precision.quantize_fp8(x, fmt="e4m3",
    granularity=granularity, block_size=block_size)`` (``margin=0``, no power-of-two scales):
    ``scale = amax · float32(1/448)`` per group of ``block_size`` tokens (``"block"``) or per token
    (``"token"``), and ``xq = round_to_nearest_even(clamp(x / scale, ±448))``. This is the
    quantisation of Q and K inside :func:`~adaattn_kernels.fp8.fp8_attention`.

    Args:
        x: CUDA tensor (or CPU under ``TRITON_INTERPRET=1``) of dtype float16, bfloat16 or
            float32 with at least 2 dims; finite (NaN/Inf are not checked here, to avoid a host
            synchronisation; ``adaattn_precision.quantize_fp8`` checks them).
        granularity: ``"block"`` or ``"token"``.
        block_size: Tokens per block for ``"block"`` (≥ 1).

    Returns:
        ``(xq, scale)``: ``xq`` of ``x``'s shape and dtype ``torch.float8_e4m3fn``; ``scale``
        float32 of shape ``(..., ceil(S / block_size))`` or ``(..., S)``.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype, or ``block_size`` is not an int.
        ValueError: bad granularity, block size, rank, empty input, or a device the kernel
            cannot run on.
    """
    x4, shape = _check_quant_input(x, granularity, block_size)
    xq, scale = quantize_rows(x4, granularity=granularity, block_size=block_size)
    return xq.reshape(shape), scale.reshape(*shape[:-2], scale.shape[-1])


def quantize_int8_triton(
    x: torch.Tensor, *, granularity: str = "block", block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` of shape ``(..., S, D)`` to symmetric int8 with a fused Triton kernel.

    Produces exactly the tensors of :func:`adaattn_kernels.fp8.quantize_int8`:
    ``scale = amax / 127`` (IEEE float32 division; 1 for an all-zero group) per group of
    ``block_size`` tokens (``"block"``) or per token (``"token"``), and
    ``xq = round_half_even(clamp(x / scale, ±127))``. This is the quantisation of Q and K inside
    :func:`~adaattn_kernels.fp8.fp8_attention` with ``qk_dtype="int8"`` (SageAttention, Zhang et
    al. 2024, arXiv 2410.02367, Sec. 3.3).

    Args:
        x: CUDA tensor (or CPU under ``TRITON_INTERPRET=1``) of dtype float16, bfloat16 or
            float32 with at least 2 dims; finite (not checked, to avoid a host synchronisation).
        granularity: ``"block"`` or ``"token"``.
        block_size: Tokens per block for ``"block"`` (≥ 1).

    Returns:
        ``(xq, scale)``: int8 ``xq`` of ``x``'s shape; float32 ``scale`` of shape
        ``(..., ceil(S / block_size))`` or ``(..., S)``.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype, or ``block_size`` is not an int.
        ValueError: bad granularity, block size, rank, empty input, or a device the kernel
            cannot run on.
    """
    x4, shape = _check_quant_input(x, granularity, block_size)
    xq, scale = quantize_rows(x4, granularity=granularity, block_size=block_size, int8=True)
    return xq.reshape(shape), scale.reshape(*shape[:-2], scale.shape[-1])
