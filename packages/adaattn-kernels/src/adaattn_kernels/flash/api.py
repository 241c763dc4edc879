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
from adaattn_kernels.flash.naive import _reference_forward, merge_attention_states_reference

__all__ = [
    "TRITON_HEAD_DIMS",
    "attention",
    "merge_attention_states_",
    "triton_unsupported_reason",
]

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


_MERGE_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_merge_inputs(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    for name, t in (("out", out), ("lse", lse), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {t.dtype}")
        if t.device != out.device:
            raise ValueError(
                f"`{name}` is on {t.device} but `out` is on {out.device}; put the four tensors "
                "on one device"
            )
    if out.dim() != 4:
        raise ValueError(f"`out` must be (B, H, S, D), got shape {tuple(out.shape)}")
    if out_b.shape != out.shape:
        raise ValueError(
            f"`out_b` has shape {tuple(out_b.shape)} but `out` has {tuple(out.shape)}; the two "
            "partial results must cover the same queries"
        )
    for name, t in (("lse", lse), ("lse_b", lse_b)):
        if t.shape != out.shape[:-1]:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}; expected {tuple(out.shape[:-1])} "
                "(the output's shape without the head dimension)"
            )
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"`lse` accumulates the merged log-sum-exp in place and must be float32 or float64, "
            f"got {lse.dtype}"
        )


def _merge_triton_reason(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> str | None:
    if not triton_installed():
        return "Triton is not installed"
    if not runs_triton(out):
        return f"`out` is on {out.device} (the kernel needs CUDA, or CPU with TRITON_INTERPRET=1)"
    for name, t in (("out", out), ("out_b", out_b)):
        if t.dtype not in _MERGE_OUT_DTYPES:
            return f"`{name}` has dtype {t.dtype}, not one of {_MERGE_OUT_DTYPES}"
        if t.stride(-1) != 1:
            return f"`{name}` has a non-contiguous last dimension"
    for name, t in (("lse", lse), ("lse_b", lse_b)):
        if t.dtype != torch.float32:
            return f"`{name}` has dtype {t.dtype}, not float32"
    if out.shape[-1] > 256:
        return f"head_dim {out.shape[-1]} is above 256"
    if out.shape[0] * out.shape[1] > _MAX_GRID_Y:
        return f"batch × heads is above {_MAX_GRID_Y}"
    return None


def merge_attention_states_(
    out: torch.Tensor,
    lse: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold a second partial attention result into a first, in place.

    ``(out, lse)`` and ``(out_b, lse_b)`` are the attention outputs and natural-log
    log-sum-exps of the same queries over two *disjoint* key sets ``A`` and ``B`` (as
    :func:`attention` returns them with ``return_lse=True``). Afterwards ``out`` and ``lse`` hold
    attention over ``A ∪ B``:

    .. math::

        \ell = \log\!\left(e^{\ell_A} + e^{\ell_B}\right), \qquad
        O = e^{\ell_A - \ell}\, O_A + e^{\ell_B - \ell}\, O_B

    (the online softmax of Milakov & Gimelshein 2018, arXiv 1805.02867, on whole blocks) — exact
    up to one rounding of the result to ``out.dtype``: the weights and the sum are float32. This
    is how ring attention combines the blocks of a sharded sequence and how split-key (flash
    decoding) attention combines its splits. On CUDA one fused Triton kernel reads each input
    once and writes ``out`` and ``lse`` in place; any stride but the last is free, so row slices
    (``out[:, :, i0:i1]``) merge without copies. Not differentiable.

    Rows whose two key sets are both empty (``lse = lse_b = -inf``) get output 0 and
    ``lse = -inf``. NaN in any input propagates to the merged row (never silently masked).

    Args:
        out: Output over ``A``, ``(B, H, S, D)``; overwritten with the merged output. float16,
            bfloat16 or float32 on the kernel path (float64 runs the reference).
        lse: Log-sum-exp over ``A``, ``(B, H, S)``, float32 (float64 on the reference path);
            overwritten with the merged log-sum-exp.
        out_b: Output over ``B``, shaped like ``out`` (any float dtype).
        lse_b: Log-sum-exp over ``B``, shaped like ``lse``.
        backend: ``"auto"`` (the Triton kernel on CUDA when supported, else the reference),
            ``"triton"`` (raise ``ValueError`` if unsupported) or ``"reference"``
            (:func:`~adaattn_kernels.flash.naive.merge_attention_states_reference`, copied back
            into ``out`` and ``lse``).

    Returns:
        ``(out, lse)``, the same tensors, merged.

    Raises:
        TypeError: non-tensor or non-floating inputs, or an ``lse`` that is not float32/float64.
        ValueError: shapes that do not match, tensors on different devices, an unknown
            ``backend``, or ``backend="triton"`` with inputs the kernel does not take.

    Example:
        >>> import torch, adaattn_kernels
        >>> q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
        >>> o_a, l_a = adaattn_kernels.attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
        >>> o_b, l_b = adaattn_kernels.attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
        >>> o, _ = adaattn_kernels.merge_attention_states_(o_a, l_a, o_b, l_b)
        >>> torch.allclose(o, adaattn_kernels.attention(q, k, v), atol=1e-6)
        True
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}")
    _check_merge_inputs(out, lse, out_b, lse_b)
    reason = _merge_triton_reason(out, lse, out_b, lse_b)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot merge these inputs: {reason}; use 'reference'")
    use_triton = backend == "triton" or (
        backend == "auto" and out.device.type == "cuda" and reason is None
    )
    if out.numel() == 0:
        return out, lse
    if not use_triton:
        merged, l_new = merge_attention_states_reference(out, lse, out_b, lse_b)
        out.copy_(merged)
        lse.copy_(l_new)
        return out, lse
    from adaattn_kernels._triton import device_ctx
    from adaattn_kernels.flash._triton_kernels import launch_merge_states

    b, h, s, d = out.shape
    block_d = max(16, 1 << (d - 1).bit_length())
    block_m = 64 if block_d <= 128 else 32
    with device_ctx(out):
        launch_merge_states(
            (-(-s // block_m), b * h),
            out, lse, out_b, lse_b,
            *out.stride()[:3], *lse.stride(), *out_b.stride()[:3], *lse_b.stride(),
            h, s,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m,
        )  # fmt: skip
    return out, lse
