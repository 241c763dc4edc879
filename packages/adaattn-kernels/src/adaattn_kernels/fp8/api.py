"""Public entry point of the FP8 attention path: validation, capability check, dispatch."""

from __future__ import annotations

from typing import Literal

import torch
from adaattn_precision import DeviceCapability, triton_available

from adaattn_kernels._triton import eager_inference, interpreting
from adaattn_kernels._validation import (
    AttentionShape,
    CausalArg,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.fp8.naive import _check_rows, _simulate, check_fp8_options
from adaattn_kernels.fp8.quant import kernel_tile_n

__all__ = [
    "FP8_HEAD_DIMS",
    "fp8_attention",
    "fp8_unsupported_reason",
]

#: Head dimensions the FP8 Triton kernel is built for.
FP8_HEAD_DIMS = (64, 128)
_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def _has_tensor_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # pragma: no cover - triton < 3.4
        return False
    return True


def _interpreting_cpu(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and interpreting()


def _capability_reason(cap: DeviceCapability) -> str | None:
    """The missing-capability message for a CUDA device without FP8 e4m3 tensor cores."""
    if cap.fp8_e4m3:
        return None
    major, minor = cap.compute_capability
    return (
        f"{cap.name} (compute capability {major}.{minor}) has no FP8 e4m3 tensor cores "
        "(capability `fp8_e4m3` of adaattn_precision.detect(); needs sm_89 or newer); use "
        "adaattn_kernels.attention (bf16/fp16) or backend='reference' to simulate FP8"
    )


def fp8_unsupported_reason(
    q: torch.Tensor, shape: AttentionShape, *, check_device: bool = True
) -> str | None:
    """Why the FP8 Triton kernel cannot run these (validated) inputs, or ``None`` if it can.

    The message names the missing capability or the argument at fault. ``check_device=False``
    skips the device probe (Triton installed, FP8 tensor cores), which
    :func:`fp8_attention` does under ``torch.compile`` tracing.
    """
    if check_device:
        if not triton_available():  # pragma: no cover - triton is a dependency on Linux
            return "Triton is not installed; install `triton` or use backend='reference'"
        if not _has_tensor_descriptors():  # pragma: no cover - triton < 3.4
            return (
                "the FP8 kernel loads K/V with TMA descriptors "
                "(triton.tools.tensor_descriptor, Triton >= 3.4); upgrade Triton or use "
                "backend='reference'"
            )
        if q.device.type == "cuda":
            from adaattn_precision import detect

            reason = _capability_reason(detect(q.device))
            if reason is not None:
                return reason
        elif not _interpreting_cpu(q):
            return (
                f"`q` is on {q.device}, which has no FP8 tensor cores (capability `fp8_e4m3`); "
                "the FP8 kernel needs a CUDA device with sm_89+ (or CPU tensors with "
                "TRITON_INTERPRET=1); use backend='reference' to simulate FP8 attention"
            )
    if q.dtype not in _TRITON_DTYPES:
        return (
            f"`q` has dtype {q.dtype}; the FP8 kernel takes float16 or bfloat16 inputs — cast "
            "them or use backend='reference'"
        )
    if shape.head_dim not in FP8_HEAD_DIMS:
        return (
            f"head_dim {shape.head_dim} (last dim of `q`) is not one of {FP8_HEAD_DIMS}; use "
            "adaattn_kernels.attention or backend='reference'"
        )
    return None


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
    pv_dtype: str = "fp8",
    granularity: str = "block",
    block_size: int = 128,
    backend: str = "auto",
    qk_dtype: Literal["int8", "fp8"] = "int8",
    outlier_channels: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention forward with 8-bit (int8 / FP8 e4m3) tensor-core matmuls, for inference.

    Quantises inside the op and computes ``softmax(τ Q Kᵀ) V`` with ``Q·Kᵀ`` in int8 (default;
    int32 accumulation) or e4m3 (per-block or per-token scales, K smoothed by its mean over the
    keys — exact under softmax; SageAttention, Zhang et al. 2024, arXiv 2410.02367) and
    ``P·V`` in e4m3 (P scaled by 2⁸, V per channel) or in the 16-bit input dtype, with fp32
    accumulation across key tiles. Exact steps: :mod:`adaattn_kernels.fp8.naive`. Measured
    relative (Frobenius) error vs float64 on i.i.d. N(0, 1) inputs (the CPU simulation,
    ``docs/kernels/fp8.md``): about 1.3e-2 with int8 ``Q·Kᵀ`` and 16-bit ``P·V``, 3.9e-2
    with int8 and e4m3 ``P·V`` (the rounding of P and V), 5.2e-2 with e4m3 for both. Query
    channels with large outliers raise it several-fold — measure a head with
    :func:`~adaattn_kernels.fp8.fp8_attention_error` before using it.

    Args:
        q: Queries ``(B, Hq, Sq, D)``, float16/bfloat16 (``D`` in :data:`FP8_HEAD_DIMS` for the
            kernel).
        k: Keys ``(B, Hkv, Sk, D)``; ``Hq % Hkv == 0`` (grouped-query attention: query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v: Values ``(B, Hkv, Sk, D)``.
        causal: ``False``; ``True`` or ``"bottom_right"``: query ``i`` attends keys
            ``j ≤ i + Sk − Sq``; ``"top_left"``: keys ``j ≤ i`` — the semantics of
            :func:`adaattn_kernels.attention`.
        scale: Multiplier ``τ`` of ``Q Kᵀ``; default ``1/sqrt(D)``.
        return_lse: Also return ``lse`` ``(B, Hq, Sq)`` float32: the natural-log log-sum-exp
            of each row's scaled scores (the smoothing shift is added back).
        pv_dtype: ``"fp8"`` (default) or ``"fp16"``: ``P·V`` in the 16-bit input dtype
            (float16 or bfloat16), slower; with ``qk_dtype="int8"`` a third of the error on
            diffuse heads (the only combination within 2e-2 on N(0, 1) inputs).
        granularity: Scale groups of Q and K: ``"block"`` (default: both per block of
            ``block_size`` tokens), ``"q_token"`` (one scale per query token, one per block of
            ``block_size`` keys: about half the error of ``"block"`` with channel outliers in
            Q; at head_dim 128 the sm_90 build spills registers, see ``docs/kernels/fp8.md``)
            or ``"token"`` (both per token).
        block_size: Tokens per scale group for ``"block"`` (1…4096). Multiples of 128 let
            the kernel apply one scale per tile.
        backend: ``"auto"`` (the Triton kernel on an FP8-capable CUDA device; the simulation
            on CPU), ``"triton"`` or ``"reference"``
            (:func:`~adaattn_kernels.fp8.fp8_attention_reference`, same quantisation).
        qk_dtype: ``"int8"`` (default): Q and K in symmetric int8 (``scale = amax/127``,
            :func:`~adaattn_kernels.fp8.quantize_int8`), ``Q·Kᵀ`` on int8 tensor cores with
            int32 accumulation (same rate as FP8 on Hopper), about 1 % score noise on N(0, 1)
            inputs; ``"fp8"``: e4m3 (``scale = amax/448``), about 3.6 %.
        outlier_channels: ``0`` (default), ``16`` or ``32``: the channels with the largest
            ``amax|Q_c|·amax|K̃_c|`` per KV head
            (:func:`~adaattn_kernels.fp8.quant.select_outlier_channels`) are computed in the
            16-bit input dtype (an extra 16- or 32-wide matmul per key tile) and the rest in
            8 bits, so channel outliers no longer set the 8-bit scales (LLM.int8()'s
            decomposition). On heads with a few 20× query channels this brings the error from
            8e-2 to 0.8e-2 … 1.2e-2 in the CPU simulation (``docs/kernels/fp8.md``); it costs one
            pass over Q and K to choose the channels and copies of K without them.

    Returns:
        The output ``(B, Hq, Sq, D)`` in ``q.dtype``, or ``(output, lse)`` if ``return_lse``.
        Rows that see no key (causal with ``Sq > Sk``) give output 0 and ``lse = -inf``.

    Raises:
        ValueError: bad shapes, devices, ``causal``, ``scale``, options or ``backend``; FP8
            requested on a CUDA device without FP8 tensor cores (the message names the
            missing ``fp8_e4m3`` capability); ``backend="triton"`` with inputs the kernel does
            not take; inputs that require grad (this op has no backward).
        TypeError: non-tensor inputs or unsupported dtypes.

    Example:
        >>> import torch
        >>> from adaattn_kernels.fp8 import fp8_attention
        >>> q = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
        >>> k = v = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
        >>> fp8_attention(q, k, v, causal=True).shape  # CPU: the float8 simulation
        torch.Size([1, 4, 64, 64])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}")
    shape = check_attention_inputs(q, k, v, allowed_dtypes=(*_TRITON_DTYPES, torch.float32))
    mode = normalize_causal(causal)
    tau = resolve_scale(scale, shape.head_dim)
    check_fp8_options(pv_dtype, granularity, block_size, qk_dtype, outlier_channels, shape.head_dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(
            "fp8_attention has no backward (FP8 attention is an inference path); call it under "
            "torch.no_grad() / torch.inference_mode() or use adaattn_kernels.attention to train"
        )
    if backend == "reference" or (backend == "auto" and q.device.type == "cpu"):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"`{name}` contains NaN or Inf; FP8 quantisation needs finite inputs"
                )
        idx = _check_rows(None, shape.seq_q, q.device)
        out, lse = _simulate(
            q, k, v, idx, mode, tau, pv_dtype, granularity, block_size, kernel_tile_n(),
            qk_dtype, outlier_channels,
        )  # fmt: skip
    else:
        # Under torch.compile the device probe (cached per device) is not traced; the eager
        # call, or Triton itself, rejects a device without FP8.
        reason = fp8_unsupported_reason(q, shape, check_device=not torch.compiler.is_compiling())
        if reason is not None:
            raise ValueError(f"fp8_attention (backend={backend!r}) cannot run: {reason}")
        from adaattn_kernels.fp8.op import _run, fp8_attention_op

        launch = _run if eager_inference(q, k, v) else fp8_attention_op
        out, lse = launch(
            q, k, v, mode, tau, pv_dtype == "fp8", granularity, block_size, qk_dtype == "int8",
            outlier_channels,
        )  # fmt: skip
    return (out, lse) if return_lse else out
