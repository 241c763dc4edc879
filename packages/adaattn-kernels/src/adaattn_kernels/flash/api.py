"""Public entry point of the dense flash-attention path: validation and backend dispatch."""

from __future__ import annotations

import torch

from adaattn_kernels._triton import eager_inference, interpreting, runs_triton, triton_installed
from adaattn_kernels._validation import (
    AttentionShape,
    CausalArg,
    check_attention_inputs,
    check_mask,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.flash.naive import _reference_forward

__all__ = ["TRITON_HEAD_DIMS", "attention", "triton_unsupported_reason"]

#: Head dimensions the Triton kernels are built for.
TRITON_HEAD_DIMS = (32, 64, 96, 128, 256)
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "reference")
# The kernels launch one grid row per (batch, head): CUDA caps grid.y at 65535.
_MAX_GRID_Y = 65535


def triton_unsupported_reason(
    q: torch.Tensor, shape: AttentionShape, attn_mask: torch.Tensor | None
) -> str | None:
    """Why the Triton kernels cannot run these (validated) inputs, or ``None`` if they can.

    The message names the argument at fault; :func:`attention` raises it as a ``ValueError``
    for ``backend="triton"`` and falls back to the reference for ``backend="auto"``.
    """
    if not triton_installed():
        return "Triton is not installed; install `triton` or use backend='reference'"
    if not runs_triton(q):
        return (
            f"`q` is on {q.device}; the Triton backend needs CUDA tensors (or CPU tensors with "
            "TRITON_INTERPRET=1); use backend='reference'"
        )
    if q.dtype not in _TRITON_DTYPES:
        return (
            f"`q` has dtype {q.dtype}; the Triton backend supports float16 and bfloat16 — cast "
            "the inputs or use backend='reference'"
        )
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreting():
        # The interpreter returns garbage for this kernel in bfloat16 (Triton 3.6, NumPy has no
        # bfloat16); compiled GPU kernels are unaffected.
        return (
            "the Triton interpreter cannot run the dense kernel in bfloat16; use float16 inputs "
            "on CPU, a CUDA device, or backend='reference'"
        )
    if shape.head_dim not in TRITON_HEAD_DIMS:
        return (
            f"head_dim {shape.head_dim} (last dim of `q`) is not one of {TRITON_HEAD_DIMS}; pad "
            "the head dimension or use backend='reference'"
        )
    if shape.batch * shape.heads_q > _MAX_GRID_Y:
        return (
            f"batch × heads of `q` is {shape.batch * shape.heads_q}, above the {_MAX_GRID_Y} "
            "programs a CUDA grid allows in its second dimension; split the batch or use "
            "backend='reference'"
        )
    if attn_mask is not None and attn_mask.requires_grad:
        return (
            "`attn_mask` requires grad, but the Triton backend gives the mask no gradient; pass "
            "`attn_mask.detach()` or use backend='reference'"
        )
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled-dot-product attention with a fused Triton (FlashAttention-2) kernel.

    Computes ``softmax(scale · Q Kᵀ + mask) V`` (Vaswani et al. 2017, Eq. 1) with the online
    softmax of FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithm 1): keys are streamed
    through on-chip memory in tiles, so memory is ``O(Sq + Sk)`` per head and the ``Sq × Sk``
    score matrix is never stored. The backward pass (Algorithm 2) recomputes the scores from
    the saved log-sum-exp. Differentiable in ``q``, ``k``, ``v`` (and in ``lse`` when returned).

    Args:
        q: Queries ``(B, Hq, Sq, D)``; float16/bfloat16 for Triton, any float for the reference.
        k: Keys ``(B, Hkv, Sk, D)``; ``Hq % Hkv == 0`` (grouped-query / multi-query attention:
            query head ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v: Values ``(B, Hkv, Sk, D)``.
        attn_mask: Optional mask broadcastable to ``(B, Hq, Sq, Sk)``: bool (``True`` = may
            attend, the SDPA meaning) or floating point (added to the scaled scores). Broadcast
            dimensions are read with stride 0, never materialised.
        causal: ``False`` (default); ``True`` or ``"bottom_right"``: query ``i`` attends keys
            ``j ≤ i + Sk − Sq`` (FlashAttention's convention, right for decoding with a KV
            cache); ``"top_left"``: keys ``j ≤ i``, which is what
            ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` does. The two
            agree when ``Sq == Sk``.
        scale: Multiplier of ``Q Kᵀ``; default ``1/sqrt(D)``.
        return_lse: Also return ``lse`` ``(B, Hq, Sq)``, the natural-log log-sum-exp of each
            query's scaled, masked scores: float32 (float64 for float64 inputs).
        backend: ``"auto"`` (Triton on CUDA when supported, else the reference), ``"triton"``
            (raise ``ValueError`` if unsupported) or ``"reference"``
            (:func:`adaattn_kernels.attention_reference`).

    Returns:
        The output ``(B, Hq, Sq, D)`` in ``q.dtype``, or ``(output, lse)`` if ``return_lse``.
        Queries whose keys are all masked give output 0 and ``lse = -inf`` (never NaN).

    Raises:
        ValueError: bad shapes, devices, mask, ``causal``, ``scale`` or ``backend``; or
            ``backend="triton"`` with inputs it does not support (the message names the input).
        TypeError: non-tensor inputs or unsupported dtypes.

    Example:
        >>> import torch, adaattn_kernels
        >>> q = torch.randn(1, 4, 16, 64)
        >>> k = v = torch.randn(1, 2, 16, 64)
        >>> adaattn_kernels.attention(q, k, v, causal=True).shape
        torch.Size([1, 4, 16, 64])
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}")
    shape = check_attention_inputs(q, k, v)
    check_mask(attn_mask, shape, q.device)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    use_triton = False
    if backend == "triton":
        reason = triton_unsupported_reason(q, shape, attn_mask)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        use_triton = True
    elif backend == "auto":
        # CPU tensors go to the reference even under TRITON_INTERPRET (the interpreter is for
        # tests); on CUDA every unsupported case falls back to the exact reference.
        use_triton = (
            q.device.type == "cuda" and triton_unsupported_reason(q, shape, attn_mask) is None
        )
    if use_triton:
        from adaattn_kernels.flash.op import _run_forward, flash_attention_op

        launch = _run_forward if eager_inference(q, k, v) else flash_attention_op
        out, lse = launch(q, k, v, attn_mask, mode, s)
    else:
        out, lse = _reference_forward(q, k, v, attn_mask, mode, s)
    return (out, lse) if return_lse else out
