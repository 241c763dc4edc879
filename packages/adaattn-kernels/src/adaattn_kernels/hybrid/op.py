"""PyTorch custom ops wrapping the Triton hybrid-attention kernels.

* ``adaattn::hybrid_far_field(k, v, segment, heads_q, nseg_max) -> (k_pooled, v_pooled)`` — the
  fused pooling kernel: segment means of K and V per query head, ``(B, Hq, nseg_max, D)`` in the
  input dtype, ``O(Sk · D)`` work per head.
* ``adaattn::hybrid_attention(q, k, v, window, sinks, segment, head_order, causal_mode, scale,
  nseg_max, plan_kind, num_exact) -> (out, lse)`` — pools the far field once, then runs every
  head (exact or hybrid) in one launch of the forward kernel. With 16-bit inputs, exact heads
  go to the dense kernel instead: an all-exact plan is one dense launch, and a mixed plan adds a
  dense launch over its exact heads only, into the same output, so each launch runs the tile
  tuned for its kind of head.

Both have fake (meta) implementations, so they trace under ``torch.compile(fullgraph=True)``.
``hybrid_attention`` has an autograd formula that differentiates the plain-PyTorch reference on
the saved inputs (float32, memory ``O(Sq · Sk)`` per head in the backward only): correct
gradients for fine-tuning and tests, not a fused backward kernel. ``causal_mode`` is a
``CAUSAL_*`` code of :mod:`adaattn_kernels._validation`; ``head_order``, ``nseg_max`` and
``plan_kind`` / ``num_exact`` are :attr:`HybridPlan.head_order`,
``HybridPlan.max_segments(Sk)``, :attr:`HybridPlan.kind` (an autotuning key) and
:attr:`HybridPlan.num_exact`;
inputs are assumed validated by :func:`adaattn_kernels.hybrid.hybrid_attention`.
"""

# No `from __future__ import annotations` here: custom_op infers the schema from annotations.
import contextlib
from typing import Any

import torch

from adaattn_kernels._triton import device_ctx
from adaattn_kernels._validation import CAUSAL_NONE, causal_offset

__all__ = ["far_field_op", "hybrid_attention_op"]

_LOG2E = 1.4426950408889634
#: Key rows per pooling step: a whole 64-row segment (seq/64 ranks) in one dependent load on a
#: GPU, which measured 27 us for 16 heads x 8192 keys x 64 dims with 32-row steps (H100, ncu,
#: latency-bound at 1.3 TB/s). 32 under the interpreter.
_POOL_BLOCK_J = {False: 64, True: 32}
#: Warps per pooling program. Two beat four and eight at every size timed (H100, CUDA-graph
#: replay, 16 heads, segment 64): 9.6 vs 15.0 / 25.5 us at 8k x 64, 28.4 vs 37.1 / 48.4 us at
#: 8k x 128, 95.6 vs 120.9 / 172.5 us at 32k x 128 (up to 3.5 TB/s with L2 hits).
_POOL_WARPS = 2


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_pool(
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    heads_q: int,
    nseg_max: int,
    zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    from adaattn_kernels.hybrid._kernels import _INTERPRET, launch_pool

    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    b, hkv, sk, d = k.shape
    # The forward kernel never reads rows past a head's segment count: no memset needed there.
    alloc = torch.zeros if zero else torch.empty
    kp = alloc((b, heads_q, nseg_max, d), dtype=k.dtype, device=k.device)
    vp = alloc((b, heads_q, nseg_max, d), dtype=v.dtype, device=v.device)
    if nseg_max == 0:
        return kp, vp
    with device_ctx(k):
        launch_pool(
            (nseg_max, b * heads_q),
            k, v, kp, vp, segment,
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            heads_q, heads_q // hkv, sk, nseg_max,
            HEAD_DIM=d, BLOCK_J=_POOL_BLOCK_J[_INTERPRET], num_warps=_POOL_WARPS,
        )  # fmt: skip
    return kp, vp


_SIDE_STREAMS: dict[tuple[int, int], "torch.cuda.Stream"] = {}


def _side_stream(t: torch.Tensor) -> "torch.cuda.Stream | None":
    """A second stream for the caller's current stream on ``t``'s GPU; ``None`` off CUDA.

    One per (device, caller stream), made once: callers on different streams (or a CUDA-graph
    capture beside eager work) never share one, so they add no dependencies between each other.
    """
    if not t.is_cuda:
        return None
    key = (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        stream = _SIDE_STREAMS[key] = torch.cuda.Stream(t.device)
    return stream


def _launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sinks: torch.Tensor,
    segment: torch.Tensor,
    head_order: torch.Tensor,
    causal_mode: int,
    scale: float,
    nseg_max: int,
    plan_kind: int,
    num_exact: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from adaattn_kernels.flash.api import triton_unsupported_reason
    from adaattn_kernels.flash.op import _run_forward, _shape
    from adaattn_kernels.hybrid._kernels import _INTERPRET, launch_fwd, seq_bucket

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    # Exact heads go to the dense kernel wherever it takes these inputs (its own check).
    dense = plan_kind != 1 and triton_unsupported_reason(q, _shape(q, k), None) is None
    if plan_kind == 0 and dense:
        return _run_forward(q, k, v, None, causal_mode, scale)  # every head exact: dense kernel
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    window, sinks, segment = window.contiguous(), sinks.contiguous(), segment.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    heads = b * hq
    side = None
    if plan_kind == 2 and dense:
        # head_order lists the exact heads first: those go to the dense kernel, the rest to
        # the hybrid kernel tuned for all-hybrid plans. On a GPU the dense launch runs on a
        # side stream, forked before the pooling it does not need, so the short hybrid
        # programs fill the SMs its last wave leaves idle.
        side = _side_stream(q)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            _run_forward(
                q, k, v, None, causal_mode, scale,
                head_idx=head_order[:num_exact], out=out, lse=lse,
            )  # fmt: skip
        head_order, plan_kind, heads = head_order[num_exact:], 1, heads - num_exact
    try:
        kp, vp = _launch_pool(k, v, segment, hq, nseg_max, zero=False)
        if nseg_max == 0:  # every head exact: the pooled pointers are never dereferenced
            kp, vp = k, v
        grid = lambda meta: (heads * triton.cdiv(sq, meta["BLOCK_M"]),)
        with device_ctx(q):
            launch_fwd(
                grid,
                q, k, v, kp, vp, out, lse,
                window, sinks, segment, head_order,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                hq, hq // hkv, sq, sk, causal_offset(causal_mode, sq, sk), max(nseg_max, 1),
                scale * _LOG2E,
                seq_bucket(sq), seq_bucket(sk), plan_kind,
                HEAD_DIM=d, CAUSAL=causal_mode != CAUSAL_NONE, IEEE=q.dtype == torch.float32,
                INTERPRET=_INTERPRET,
            )  # fmt: skip
    finally:
        if side is not None:
            # Join (also on error): later work on the caller's stream, and the allocator's
            # reuse of the inputs, wait for the dense launch too; no tensor needs record_stream.
            torch.cuda.current_stream(q.device).wait_stream(side)
    return out, lse


@torch.library.custom_op("adaattn::hybrid_far_field", mutates_args=())
def far_field_op(
    k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor, heads_q: int, nseg_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled far-field keys/values ``(B, heads_q, nseg_max, D)`` (Triton pooling kernel)."""
    return _launch_pool(k, v, segment, heads_q, nseg_max)


@far_field_op.register_fake
def _far_field_fake(
    k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor, heads_q: int, nseg_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, _, d = k.shape
    return (
        k.new_empty((b, heads_q, nseg_max, d)),
        v.new_empty((b, heads_q, nseg_max, d)),
    )


@torch.library.custom_op("adaattn::hybrid_attention", mutates_args=())
def hybrid_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sinks: torch.Tensor,
    segment: torch.Tensor,
    head_order: torch.Tensor,
    causal_mode: int,
    scale: float,
    nseg_max: int,
    plan_kind: int,
    num_exact: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid attention forward ``(out, lse)`` with per-(batch, head) int32 plan tensors."""
    return _launch_forward(
        q, k, v, window, sinks, segment, head_order, causal_mode, scale, nseg_max, plan_kind,
        num_exact,
    )  # fmt: skip


@hybrid_attention_op.register_fake
def _hybrid_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sinks: torch.Tensor,
    segment: torch.Tensor,
    head_order: torch.Tensor,
    causal_mode: int,
    scale: float,
    nseg_max: int,
    plan_kind: int,
    num_exact: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, v, window, sinks, segment, _, causal_mode, scale, _, _, _ = inputs
    ctx.save_for_backward(q, k, v, window, sinks, segment)
    ctx.causal_mode = causal_mode
    ctx.scale = scale


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
    from adaattn_kernels.hybrid.naive import _reference_forward
    from adaattn_kernels.hybrid.plan import HybridPlan

    q, k, v, window, sinks, segment = ctx.saved_tensors
    plan = HybridPlan(window, sinks, segment)
    with torch.enable_grad():
        q_ = q.detach().float().requires_grad_(q.requires_grad)
        k_ = k.detach().float().requires_grad_(k.requires_grad)
        v_ = v.detach().float().requires_grad_(v.requires_grad)
        out, lse = _reference_forward(q_, k_, v_, plan, ctx.causal_mode, ctx.scale)
        outs, grads = [out], [grad_out.float()]
        if grad_lse is not None:
            finite = torch.isfinite(lse)
            outs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            grads.append(torch.where(finite, grad_lse.float(), torch.zeros_like(lse)))
        wrt = [t for t in (q_, k_, v_) if t.requires_grad]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if wrt else iter(())
    dq = next(got).to(q.dtype) if q_.requires_grad else None
    dk = next(got).to(k.dtype) if k_.requires_grad else None
    dv = next(got).to(v.dtype) if v_.requires_grad else None
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)
