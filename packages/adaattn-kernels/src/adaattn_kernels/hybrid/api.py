"""Public entry points of the hybrid path: validation and backend dispatch."""

from __future__ import annotations

import torch

from adaattn_kernels._triton import eager_inference, runs_triton, triton_installed
from adaattn_kernels._validation import (
    AttentionShape,
    CausalArg,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.hybrid.naive import (
    _check_plan,
    _reference_forward,
    pooled_far_field_reference,
)
from adaattn_kernels.hybrid.plan import HybridPlan

__all__ = ["HYBRID_TRITON_HEAD_DIMS", "build_far_field", "hybrid_attention"]

#: Head dimensions the hybrid Triton kernels are built for.
HYBRID_TRITON_HEAD_DIMS = (32, 64, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "reference")


def _triton_unsupported_reason(q: torch.Tensor, shape: AttentionShape) -> str | None:
    if not triton_installed():  # pragma: no cover - triton is a dependency on Linux
        return "Triton is not installed; install `triton` or use backend='reference'"
    if not runs_triton(q):
        return (
            f"`q` is on {q.device}; the Triton backend needs CUDA tensors (or CPU tensors with "
            "TRITON_INTERPRET=1); use backend='reference'"
        )
    if q.dtype not in _TRITON_DTYPES:
        return (
            f"`q` has dtype {q.dtype}; the hybrid Triton kernel supports float16, bfloat16 and "
            "float32 (IEEE dots, slow) — cast the inputs or use backend='reference'"
        )
    if shape.head_dim not in HYBRID_TRITON_HEAD_DIMS:
        return (
            f"head_dim {shape.head_dim} (last dim of `q`) is not one of "
            f"{HYBRID_TRITON_HEAD_DIMS}; pad the head dimension or use backend='reference'"
        )
    return None


def _use_triton(backend: str, q: torch.Tensor, shape: AttentionShape) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        reason = _triton_unsupported_reason(q, shape)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run these inputs: {reason}")
        return True
    if backend == "auto":
        # CPU tensors go to the reference even under TRITON_INTERPRET (the interpreter is for
        # tests), as in adaattn_kernels.attention.
        return q.device.type == "cuda" and _triton_unsupported_reason(q, shape) is None
    return False


def _plan_on(plan: HybridPlan, device: torch.device) -> HybridPlan:
    if plan.device != device:
        raise ValueError(
            f"`plan` is on {plan.device} but `q` is on {device}; build it on the inputs' device "
            "(HybridPlan.build(..., device=q.device)) or call plan.to(q.device) once"
        )
    return plan


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Attention with a per-head plan: exact, or exact sinks + local window + pooled far field.

    For each (batch, query head) the ``plan`` says either *exact* (all allowed keys, as
    :func:`adaattn_kernels.attention`) or *hybrid(w, s, g)*: exact attention over the ``s`` sink
    keys and a local window of ``w`` keys, plus attention over segment means of the far-field keys
    and values (segments of ``g`` keys; score ``σ q·k̄_t + log n_t``), all merged in one online
    softmax (FlashAttention-2, Dao 2023, Algorithm 1). The decomposition covers each allowed key
    exactly once; see :mod:`adaattn_kernels.hybrid.naive`. Low rank for the diffuse far field
    follows Scatterbrain (Chen et al., NeurIPS 2021); local + sink heads follow StreamingLLM /
    DuoAttention (Xiao et al. 2023, 2024).

    Cost per hybrid head is ``O(Sq · (w + s + Sk/g) · D)`` instead of ``O(Sq · Sk · D)``, plus one
    ``O(Sk · D)`` pooling pass; extra memory is the pooled buffers, ``O(Sk/g · D)`` per head.
    Heads with different plans run in one kernel launch (exact heads scheduled first).

    Args:
        q: Queries ``(B, Hq, Sq, D)``: float16/bfloat16 (float32 allowed) for Triton, any float
            for the reference.
        k: Keys ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0`` (query head ``h`` reads kv head
            ``h // (Hq / Hkv)``).
        v: Values ``(B, Hkv, Sk, D)``.
        plan: :class:`~adaattn_kernels.hybrid.plan.HybridPlan` of shape ``(B, Hq)`` on the
            inputs' device.
        causal: ``False``; ``True``/``"bottom_right"`` (keys ``j ≤ i + Sk − Sq``) or
            ``"top_left"`` (keys ``j ≤ i``), as in :func:`adaattn_kernels.attention`.
        scale: Score scale ``σ``, default ``1/sqrt(D)``.
        return_lse: Also return the natural-log log-sum-exp ``(B, Hq, Sq)`` float32
            (float64 for float64 inputs).
        backend: ``"auto"`` (Triton for supported CUDA inputs, else the reference),
            ``"triton"`` (raise if unsupported; CPU tensors need ``TRITON_INTERPRET=1``) or
            ``"reference"`` (:func:`~adaattn_kernels.hybrid.naive.hybrid_attention_reference`).

    Returns:
        Output ``(B, Hq, Sq, D)`` in ``q.dtype`` (and ``lse``). Rows with no allowed key give 0
        and ``lse = -inf``. Differentiable (the backward recomputes through the reference).

    Raises:
        ValueError: Bad shapes/devices, plan shape or device, ``causal``, ``scale``, ``backend``,
            or inputs that ``backend="triton"`` cannot run (the message says why).
        TypeError: Non-tensor inputs, unsupported dtypes, ``plan`` not a ``HybridPlan``.

    Example:
        >>> import torch
        >>> from adaattn_kernels.hybrid import HybridPlan, hybrid_attention
        >>> q = torch.randn(1, 4, 256, 64)
        >>> k = v = torch.randn(1, 2, 256, 64)
        >>> plan = HybridPlan.uniform(1, 4, seq_len_k=256, window=64, rank=16, sinks=4)
        >>> hybrid_attention(q, k, v, plan, causal=True).shape
        torch.Size([1, 4, 256, 64])
    """
    shape = check_attention_inputs(q, k, v)
    _check_plan(plan, shape.batch, shape.heads_q)
    plan = _plan_on(plan, q.device)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    if _use_triton(backend, q, shape):
        from adaattn_kernels.hybrid.op import _launch_forward, hybrid_attention_op

        args = (
            q, k, v, plan.window, plan.sinks, plan.segment, plan.head_order, mode, s,
            plan.max_segments(shape.seq_k), plan.kind, plan.num_exact,
        )  # fmt: skip
        launch = _launch_forward if eager_inference(q, k, v) else hybrid_attention_op
        out, lse = launch(*args)
    else:
        out, lse = _reference_forward(q, k, v, plan, mode, s)
    return (out, lse) if return_lse else out


def build_far_field(
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled far-field keys and values (segment means), once per call, ``O(Sk · D)`` per head.

    :func:`hybrid_attention` calls the fused pooling kernel itself; this entry point exposes it
    for inspection and tests.

    Args:
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)``.
        plan: Plan ``(B, Hq)``; the number of query heads is read from it.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (as in :func:`hybrid_attention`).

    Returns:
        ``(k_pooled, v_pooled)``, each ``(B, Hq, T, D)`` with ``T = plan.max_segments(Sk)``:
        input dtype from Triton, float32 from the reference. Rows past a head's segment count,
        and all rows of exact heads, are zero.
    """
    if not isinstance(plan, HybridPlan):
        raise TypeError(f"`plan` must be a HybridPlan, got {type(plan).__name__}")
    batch, heads_q = plan.shape
    kv = check_attention_inputs(k, k, v)  # validates k and v (k stands in for q)
    if kv.batch != batch:
        raise ValueError(f"`plan` has batch {batch} but `k` has batch {kv.batch}")
    if heads_q % kv.heads_kv != 0:
        raise ValueError(
            f"`plan` has {heads_q} query heads, not a multiple of the {kv.heads_kv} heads of `k`"
        )
    plan = _plan_on(plan, k.device)
    shape = AttentionShape(batch, heads_q, kv.heads_kv, 1, kv.seq_k, kv.head_dim)
    if _use_triton(backend, k, shape):
        from adaattn_kernels.hybrid.op import far_field_op

        return far_field_op(k, v, plan.segment, heads_q, plan.max_segments(shape.seq_k))
    return pooled_far_field_reference(k, v, plan, heads_q=heads_q)
