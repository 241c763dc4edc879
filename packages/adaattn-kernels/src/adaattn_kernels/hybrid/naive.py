r"""Plain-PyTorch reference of hybrid (exact near field + pooled far field) attention.

This module is the specification the Triton kernels are tested against. For a hybrid head with
window ``w``, sinks ``s`` and segment size ``g``, the keys a query may attend (all ``Sk`` keys, or
``j ≤ i + o`` under a causal mask, ``o`` the diagonal offset) are split into three disjoint
parts that together cover every allowed key exactly once:

* **sinks** — keys ``[0, s')`` with ``s' = g · ⌈s / g⌉`` (the sink count rounded *up* to a
  segment boundary, clipped to ``Sk``), attended exactly;
* **window** — keys ``[max(⌊ws / g⌋ · g, s'), we')`` attended exactly, where ``[ws, we)`` is the
  local window: causal, the ``w`` most recent allowed keys ``[hi − w, hi)`` with
  ``hi = i + o + 1`` and ``we' = hi``; non-causal, ``w`` keys centred on the diagonal
  ``c = i + Sk − Sq`` and shifted to stay inside ``[0, Sk)``, with ``we' = g · ⌈we / g⌉`` (both
  window edges rounded *outwards* to segment boundaries);
* **far field** — every other allowed key lies in a segment ``[t·g, min((t+1)·g, Sk))`` that is
  entirely allowed and entirely outside sinks and window: causal, the segments ``t`` with
  ``⌈s/g⌉ ≤ t < ⌊ws/g⌋``; non-causal also those with ``max(⌈we/g⌉, ⌈s/g⌉) ≤ t < ⌈Sk/g⌉``.

Each far segment ``t`` with ``n_t`` keys is replaced by one pooled key/value pair (its segment
mean) whose score carries the log-multiplicity ``log n_t``:

.. math::

    \bar k_t = \frac1{n_t}\sum_{j \in t} k_j,\quad
    \bar v_t = \frac1{n_t}\sum_{j \in t} v_j,\quad
    \tilde s_{it} = \sigma\, q_i\cdot \bar k_t + \log n_t .

Why segment means: by linearity ``σ q·k̄_t`` is exactly the *mean* score of the segment, so the
pooled term ``n_t e^{σ q·k̄_t} v̄_t`` equals the segment's true contribution
``Σ_j e^{σ q·k_j} v_j`` whenever the scores are flat within the segment — the diffuse regime
the hybrid plan is for (Scatterbrain, Chen et al. NeurIPS 2021, §3: low rank for high-entropy
attention). Otherwise the error is second order in the within-segment score spread: by Jensen,
``log mean_j e^{s_j} − mean_j s_j ≈ ½ Var_j(s_j)`` (the cumulant expansion), which is what
:func:`~adaattn_kernels.hybrid.estimate.predict_hybrid_error` measures. With ``g = 1`` the
pooled keys are the keys themselves (``log 1 = 0``) and with ``w ≥ Sk`` there is no far field:
both give exact attention. The pooled buffers are ``O(Sk / g · D)`` per head, computed once per
call in ``O(Sk · D)``.

Exact heads (segment size 0) attend every allowed key exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaattn_kernels._validation import (
    CAUSAL_NONE,
    CausalArg,
    causal_offset,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.hybrid.plan import HybridPlan

__all__ = ["hybrid_attention_reference", "hybrid_key_coverage", "pooled_far_field_reference"]

# Scores held at a time by the reference: chunk · (Sk + segments) elements per (batch, head).
_MAX_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class _RowBounds:
    """Per (B, H, row) integer bounds of the decomposition (all int64, broadcast together)."""

    hi: torch.Tensor  # allowed keys are [0, hi)
    sink_hi: torch.Tensor  # exact keys [0, sink_hi)
    ex_lo: torch.Tensor  # exact keys [ex_lo, ex_hi)
    ex_hi: torch.Tensor
    left_lo: torch.Tensor  # pooled segments [left_lo, left_hi)
    left_hi: torch.Tensor
    right_lo: torch.Tensor  # pooled segments [right_lo, nseg)
    nseg: torch.Tensor
    seg: torch.Tensor  # segment size (>= 1; 1 on exact heads)


def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a + b - 1) // b


def _row_bounds(
    plan: HybridPlan, rows: torch.Tensor, seq_q: int, seq_k: int, mode: int
) -> _RowBounds:
    """Decomposition bounds for query ``rows`` (1-D int64) of every (batch, head) of ``plan``.

    Mirrors, formula for formula, the index arithmetic of the Triton kernel.
    """
    return _bounds_of(plan.window, plan.sinks, plan.segment, rows, seq_q, seq_k, mode)


def _bounds_of(
    window: torch.Tensor,
    sinks: torch.Tensor,
    segment: torch.Tensor,
    rows: torch.Tensor,
    seq_q: int,
    seq_k: int,
    mode: int,
) -> _RowBounds:
    """:func:`_row_bounds` from broadcastable ``(B, H)`` window/sinks/segment tensors.

    For callers that score many candidate plans at once without building (and validating)
    a :class:`HybridPlan` for each; ``segment`` 0 marks an exact head, as in a plan.
    """
    dev = rows.device
    w = window.to(dev, torch.int64)[..., None]
    s = sinks.to(dev, torch.int64)[..., None]
    g_raw = segment.to(dev, torch.int64)[..., None]
    exact = g_raw == 0
    g = g_raw.clamp_min(1)
    i = rows.to(torch.int64)[None, None, :]
    zero = torch.zeros_like(i)
    if mode == CAUSAL_NONE:
        hi = torch.full_like(i, seq_k)
    else:
        hi = (i + causal_offset(mode, seq_q, seq_k) + 1).clamp(0, seq_k)
    t_lo = _ceil_div(s, g)
    s_end = (t_lo * g).clamp_max(seq_k)
    if mode == CAUSAL_NONE:
        c = (i + seq_k - seq_q).clamp(0, seq_k - 1)
        ws = torch.minimum((c - w // 2).clamp_min(0), (seq_k - w).clamp_min(0))
        we = (ws + w).clamp_max(seq_k)
        ex_hi = (_ceil_div(we, g) * g).clamp_max(seq_k)
        right_lo = torch.maximum(_ceil_div(we, g), t_lo)
    else:
        ws = (hi - w).clamp_min(0)
        ex_hi = hi
        right_lo = torch.full_like(hi, torch.iinfo(torch.int32).max)
    wsa = (ws // g) * g
    ex_lo = torch.maximum(wsa, s_end)
    sink_hi = torch.minimum(s_end, hi)
    left_hi = wsa // g
    nseg = _ceil_div(torch.full_like(g, seq_k), g)
    # Exact heads: every allowed key is a "sink"; no window, no pooled segments.
    sink_hi = torch.where(exact, hi, sink_hi)
    ex_lo = torch.where(exact, zero, ex_lo)
    ex_hi = torch.where(exact, zero, ex_hi)
    left_hi = torch.where(exact, zero, left_hi)
    right_lo = torch.where(exact, torch.full_like(right_lo, torch.iinfo(torch.int32).max), right_lo)
    return _RowBounds(hi, sink_hi, ex_lo, ex_hi, t_lo, left_hi, right_lo, nseg, g)


def _masks(
    bounds: _RowBounds, seq_k: int, num_seg: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks ``(B, H, M, Sk)`` of exact keys and ``(B, H, M, num_seg)`` of pooled segments."""
    j = torch.arange(seq_k, device=device)
    exact = (j < bounds.sink_hi[..., None]) | (
        (j >= bounds.ex_lo[..., None]) & (j < bounds.ex_hi[..., None])
    )
    t = torch.arange(num_seg, device=device)
    pooled = ((t >= bounds.left_lo[..., None]) & (t < bounds.left_hi[..., None])) | (
        (t >= bounds.right_lo[..., None]) & (t < bounds.nseg[..., None])
    )
    return exact, pooled


def _expand_kv(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    return x.repeat_interleave(heads_q // x.shape[1], dim=1)


def _pooled(
    k: torch.Tensor, v: torch.Tensor, plan: HybridPlan, heads_q: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segment means ``(B, Hq, T, D)`` of K and V in ``dtype``, and counts ``(B, Hq, T)``."""
    b, _, sk, d = k.shape
    num_seg = max(plan.max_segments(sk), 1)
    g = plan.segment.to(k.device, torch.int64).clamp_min(1)  # (B, H)
    seg_id = torch.arange(sk, device=k.device)[None, None, :] // g[..., None]  # (B, H, Sk)
    seg_id = seg_id.clamp_max(num_seg - 1)  # only exact heads (g=1 placeholder) can overflow
    kq = _expand_kv(k, heads_q).to(dtype)
    vq = _expand_kv(v, heads_q).to(dtype)
    idx = seg_id[..., None].expand(b, heads_q, sk, d)
    kp = torch.zeros(b, heads_q, num_seg, d, dtype=dtype, device=k.device).scatter_add_(2, idx, kq)
    vp = torch.zeros(b, heads_q, num_seg, d, dtype=dtype, device=k.device).scatter_add_(2, idx, vq)
    cnt = torch.zeros(b, heads_q, num_seg, dtype=dtype, device=k.device).scatter_add_(
        2, seg_id, torch.ones_like(seg_id, dtype=dtype)
    )
    denom = cnt.clamp_min(1)[..., None]
    return kp / denom, vp / denom, cnt


def _check_plan(plan: HybridPlan, batch: int, heads_q: int) -> None:
    if not isinstance(plan, HybridPlan):
        raise TypeError(
            f"`plan` must be a HybridPlan (see HybridPlan.build), got {type(plan).__name__}"
        )
    if plan.shape != (batch, heads_q):
        raise ValueError(
            f"`plan` covers (batch, heads) = {plan.shape} but `q` has (B, Hq) = "
            f"{(batch, heads_q)}; build one plan entry per query head"
        )


def _hybrid_rows(
    q_rows: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    mode: int,
    scale: float,
    seq_q: int,
    pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid output and lse for the query rows ``rows`` (``q_rows`` is ``(B, Hq, M, D)``).

    Computed in float32 (float64 for float64 inputs); returns ``(out, lse)`` in that dtype.
    """
    hq = q_rows.shape[1]
    sk = k.shape[2]
    acc = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    if pooled is None:
        pooled = _pooled(k, v, plan, hq, acc)
    kp, vp, cnt = pooled
    bounds = _row_bounds(plan, rows, seq_q, sk, mode)
    ex_mask, pool_mask = _masks(bounds, sk, kp.shape[2], q_rows.device)
    q32 = q_rows.to(acc)
    kq = _expand_kv(k, hq).to(acc)
    vq = _expand_kv(v, hq).to(acc)
    s_ex = torch.matmul(q32, kq.transpose(-1, -2)) * scale
    s_ex = s_ex.masked_fill(~ex_mask, float("-inf"))
    log_cnt = torch.log(cnt.clamp_min(1))[:, :, None, :]
    s_pool = torch.matmul(q32, kp.transpose(-1, -2)) * scale + log_cnt
    s_pool = s_pool.masked_fill(~pool_mask, float("-inf"))
    scores = torch.cat([s_ex, s_pool], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p[..., :sk], vq) + torch.matmul(p[..., sk:], vp)
    out = out / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def _reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated core of :func:`hybrid_attention_reference`; output in ``q.dtype``."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pooled = _pooled(k, v, plan, hq, acc)
    width = sk + pooled[0].shape[2]
    chunk = max(1, min(sq, _MAX_CHUNK_ELEMENTS // max(1, b * hq * width)))
    outs, lses = [], []
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        rows = torch.arange(i0, i1, device=q.device)
        o, lse = _hybrid_rows(q[:, :, i0:i1], rows, k, v, plan, mode, scale, sq, pooled)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hybrid attention in plain PyTorch (float32 math; float64 for float64 inputs).

    Same contract as :func:`adaattn_kernels.hybrid.hybrid_attention`; see the module docstring
    for the decomposition. Memory is ``O(chunk · Sk)`` (chunked over queries); differentiable.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``.
        v: Values ``(B, Hkv, Sk, D)``.
        plan: Per-(batch, query head) :class:`~adaattn_kernels.hybrid.plan.HybridPlan`.
        causal: ``False``; ``True``/``"bottom_right"`` (keys ``j ≤ i + Sk − Sq``) or
            ``"top_left"`` (keys ``j ≤ i``).
        scale: Score scale, default ``1/sqrt(D)``.
        return_lse: Also return the natural-log log-sum-exp ``(B, Hq, Sq)`` of the hybrid scores.

    Returns:
        Output ``(B, Hq, Sq, D)`` in ``q.dtype`` (and the lse in float32/float64). Rows with no
        allowed key give 0 and ``lse = -inf``.

    Raises:
        ValueError: Bad shapes/devices, a plan of the wrong shape, bad ``causal`` or ``scale``.
        TypeError: Non-tensor inputs, unsupported dtypes or a non-plan ``plan``.
    """
    shape = check_attention_inputs(q, k, v)
    _check_plan(plan, shape.batch, shape.heads_q)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    out, lse = _reference_forward(q, k, v, plan.to(q.device), mode, s)
    return (out, lse) if return_lse else out


def pooled_far_field_reference(
    k: torch.Tensor, v: torch.Tensor, plan: HybridPlan, *, heads_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment means of keys and values per query head, the far-field buffers (reference).

    Args:
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)``.
        plan: Plan of shape ``(B, heads_q)``; head ``h`` pools kv head ``h // (heads_q / Hkv)``
            with its own segment size.
        heads_q: Number of query heads.

    Returns:
        ``(k_pooled, v_pooled)``, each ``(B, heads_q, T, D)`` float32 (float64 for float64 input)
        with ``T = plan.max_segments(Sk)``; rows past a head's own segment count (and all rows of
        exact heads) are zero.
    """
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"`k` and `v` must share one 4-D shape, got {k.shape} and {v.shape}")
    if heads_q % k.shape[1] != 0:
        raise ValueError(f"heads_q={heads_q} must be a multiple of the {k.shape[1]} kv heads")
    _check_plan(plan, k.shape[0], heads_q)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    plan = plan.to(k.device)
    kp, vp, cnt = _pooled(k, v, plan, heads_q, acc)
    valid = (cnt > 0) & (plan.segment > 0)[..., None]
    if plan.max_segments(k.shape[2]) == 0:
        return kp[:, :, :0], vp[:, :, :0]
    return kp * valid[..., None], vp * valid[..., None]


def hybrid_key_coverage(
    plan: HybridPlan, *, seq_q: int, seq_k: int, causal: CausalArg = False
) -> torch.Tensor:
    """How many times each key enters each query's hybrid softmax (exactly or via its segment).

    Used to check that the decomposition covers every allowed key exactly once: the result
    equals the allowed-key mask (1 where query ``i`` may attend key ``j``, else 0).

    Args:
        plan: The plan, shape ``(B, H)``.
        seq_q: Number of queries ``Sq``.
        seq_k: Number of keys ``Sk``.
        causal: Causal convention, as in :func:`hybrid_attention_reference`.

    Returns:
        ``(B, H, Sq, Sk)`` int64 counts.
    """
    mode = normalize_causal(causal)
    dev = plan.device
    rows = torch.arange(seq_q, device=dev)
    bounds = _row_bounds(plan, rows, seq_q, seq_k, mode)
    num_seg = max(plan.max_segments(seq_k), 1)
    ex_mask, pool_mask = _masks(bounds, seq_k, num_seg, dev)
    seg_of_key = torch.arange(seq_k, device=dev)[None, None, :] // bounds.seg  # (B, H, Sk)
    seg_of_key = seg_of_key.clamp_max(num_seg - 1)
    b, h, m, _ = ex_mask.shape
    via_pool = torch.gather(pool_mask, 3, seg_of_key[:, :, None, :].expand(b, h, m, seq_k))
    via_pool = via_pool & (plan.segment.to(dev) > 0)[..., None, None]
    return ex_mask.long() + via_pool.long()
