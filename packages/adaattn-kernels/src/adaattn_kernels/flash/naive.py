"""Plain-PyTorch reference for exact scaled-dot-product attention.

This is the ground truth the Triton kernels are tested against, and the ``backend="reference"``
(and CPU ``"auto"``) path of :func:`adaattn_kernels.attention`. It computes

    O = softmax(s · Q Kᵀ + M) V,    lse_i = log Σ_j exp(s · q_i·k_j + M_ij)

(Vaswani et al. 2017, "Attention Is All You Need", Eq. 1), in chunks of queries so that the extra
memory is ``O(chunk · Sk)`` rather than ``O(Sq · Sk)``, with float32 accumulation for 16-bit inputs
(float64 stays float64). Autograd flows through it to ``q``, ``k``, ``v`` and a floating mask.
"""

from __future__ import annotations

import math

import torch

from adaattn_kernels._validation import (
    CAUSAL_NONE,
    AttentionShape,
    CausalArg,
    causal_offset,
    check_attention_inputs,
    check_mask,
    expand_mask,
    normalize_causal,
    resolve_scale,
)

__all__ = [
    "attention_backward_reference",
    "attention_reference",
    "merge_attention_states_reference",
]

# Scores held at a time: chunk · Sk elements (≈ 64 MiB of float32 at the default).
_MAX_CHUNK_ELEMENTS = 1 << 24


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "reference",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in plain PyTorch, chunked over queries (the correctness reference).

    Same contract as :func:`adaattn_kernels.attention`: ``q`` is ``(B, Hq, Sq, D)``, ``k`` and
    ``v`` are ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (query head ``h`` reads key/value head
    ``h // (Hq // Hkv)``). Rows whose keys are all masked give output 0 and ``lse = -inf``.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)``.
        attn_mask: Optional bool mask (``True`` = may attend) or additive float mask,
            broadcastable to ``(B, Hq, Sq, Sk)``.
        causal: ``False``; ``True`` or ``"bottom_right"`` (query ``i`` attends keys
            ``j ≤ i + Sk − Sq``); ``"top_left"`` (keys ``j ≤ i``, as SDPA's ``is_causal``).
        scale: Score scale; defaults to ``1/sqrt(D)``.
        return_lse: Also return the float32 (float64 for float64 inputs) log-sum-exp of the scaled
            scores per query, shape ``(B, Hq, Sq)``, natural log.
        backend: Must be ``"reference"``; present so the signature matches
            :func:`adaattn_kernels.attention`.

    Returns:
        The output ``(B, Hq, Sq, D)`` in ``q.dtype``, or ``(output, lse)``.

    Raises:
        ValueError: invalid shapes, devices, mask, causal mode or scale (see the message).
        TypeError: unsupported dtypes.
    """
    if backend != "reference":
        raise ValueError(f"`backend` of attention_reference must be 'reference', got {backend!r}")
    shape = check_attention_inputs(q, k, v)
    check_mask(attn_mask, shape, q.device)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    out, lse = _reference_forward(q, k, v, attn_mask, mode, s)
    return (out, lse) if return_lse else out


def _reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    mode: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated core of :func:`attention_reference` (``mode`` is a ``CAUSAL_*`` code)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Grouped view: query head h = kv_head * g + r reads kv head `kv_head`.
    qg = q.reshape(b, hkv, g, sq, d).to(acc)
    kg = k.to(acc).unsqueeze(2)  # (B, Hkv, 1, Sk, D)
    vg = v.to(acc).unsqueeze(2)
    mask = None
    if attn_mask is not None:
        mask = expand_mask(attn_mask, AttentionShape(b, hq, hkv, sq, sk, d)).reshape(
            b, hkv, g, sq, sk
        )
    offset = causal_offset(mode, sq, sk)
    chunk = max(1, min(sq, _MAX_CHUNK_ELEMENTS // max(1, b * hq * sk)))
    outs, lses = [], []
    key_idx = torch.arange(sk, device=q.device)
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        scores = torch.matmul(qg[:, :, :, i0:i1], kg.transpose(-1, -2)) * scale
        if mask is not None:
            m = mask[..., i0:i1, :]
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m, float("-inf"))
            else:
                scores = scores + m.to(acc)
        if mode != CAUSAL_NONE:
            q_idx = torch.arange(i0, i1, device=q.device)
            allowed = key_idx[None, :] <= (q_idx[:, None] + offset)
            scores = scores.masked_fill(~allowed, float("-inf"))
        # Max subtraction is exact maths (softmax is shift-invariant): no gradient through it.
        row_max = scores.amax(dim=-1, keepdim=True).detach()
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p, vg) / torch.where(denom == 0, torch.ones_like(denom), denom)
        lse = (row_max + torch.log(denom)).squeeze(-1)  # log 0 = -inf for fully masked rows
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(b, hq, sq, d).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(b, hq, sq)
    return out, lse


def attention_backward_reference(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None = None,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of attention from its output and log-sum-exp, in PyTorch.

    The contract of the Triton backward op (``adaattn::flash_attention_backward``) without a
    mask: FlashAttention-2's backward maths (Dao 2023, arXiv 2307.08691, Algorithm 2),
    ``P = exp(s·QKᵀ − lse)``, ``Δ = rowsum(dO ∘ O) − dlse``, ``dS = P ∘ (dO Vᵀ − Δ)``,
    ``dQ = s·dS K``, ``dK = s·dSᵀ Q``, ``dV = Pᵀ dO``, in chunks of queries (``O(chunk · Sk)``
    memory). ``out`` and ``lse`` may be those of a *larger* key set than ``k``/``v`` (the global
    softmax of ring attention): then ``P`` is this block's slice of it and the gradients of the
    blocks add up to the full gradient.

    Args:
        do: Gradient of the output ``(B, Hq, Sq, D)``.
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``, ``Hq % Hkv == 0``.
        v: Values ``(B, Hkv, Sk, D)``.
        out: The attention output ``(B, Hq, Sq, D)``.
        lse: Its natural-log log-sum-exp ``(B, Hq, Sq)``; its dtype is the accumulation dtype
            (float32, or float64) and that of the returned gradients.
        dlse: Optional gradient of ``lse`` ``(B, Hq, Sq)``.
        causal: As in :func:`attention_reference`.
        scale: Multiplier of ``Q Kᵀ``; default ``1/sqrt(D)``.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``, in ``lse.dtype``.
    """
    shape = check_attention_inputs(q, k, v)
    s = resolve_scale(scale, shape.head_dim)
    mode = normalize_causal(causal)
    diag = causal_offset(mode, shape.seq_q, shape.seq_k)
    b, hq, sq, d = q.shape
    hkv, sk = shape.heads_kv, shape.seq_k
    g = hq // hkv
    acc = lse.dtype
    qg = q.reshape(b, hkv, g, sq, d).to(acc)
    dog = do.reshape(b, hkv, g, sq, d).to(acc)
    kg = k.to(acc).unsqueeze(2)  # (B, Hkv, 1, Sk, D)
    vg = v.to(acc).unsqueeze(2)
    lseg = lse.reshape(b, hkv, g, sq)
    lseg = torch.where(torch.isneginf(lseg), torch.full_like(lseg, math.inf), lseg)  # P = 0
    delta = (dog * out.reshape(b, hkv, g, sq, d).to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.reshape(b, hkv, g, sq).to(acc)
    dq = torch.empty_like(qg)
    dk = torch.zeros((b, hkv, sk, d), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    chunk = max(1, min(sq, _MAX_CHUNK_ELEMENTS // max(1, b * hq * sk)))
    key_idx = torch.arange(sk, device=q.device)
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        scores = torch.matmul(qg[..., i0:i1, :], kg.transpose(-1, -2)) * s
        if mode != CAUSAL_NONE:
            q_idx = torch.arange(i0, i1, device=q.device)
            scores = scores.masked_fill(key_idx[None, :] > q_idx[:, None] + diag, float("-inf"))
        p = torch.exp(scores - lseg[..., i0:i1, None])
        do_c = dog[..., i0:i1, :]
        dv += torch.matmul(p.transpose(-1, -2), do_c).sum(2)
        ds = p * (torch.matmul(do_c, vg.transpose(-1, -2)) - delta[..., i0:i1, None])
        dq[..., i0:i1, :] = torch.matmul(ds, kg) * s
        dk += torch.matmul(ds.transpose(-1, -2), qg[..., i0:i1, :]).sum(2) * s
    return dq.reshape(b, hq, sq, d), dk, dv


def merge_attention_states_reference(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results, in PyTorch.

    With ``ℓ = log(e^{ℓ_A} + e^{ℓ_B})`` the merged output is
    ``O = e^{ℓ_A − ℓ} O_A + e^{ℓ_B − ℓ} O_B`` (the online softmax of Milakov & Gimelshein 2018,
    arXiv 1805.02867, applied to whole blocks), computed in float32 (float64 for float64
    inputs). Rows whose two key sets are both empty (``ℓ_A = ℓ_B = −inf``) give output 0 and
    ``ℓ = −inf``; NaN in either input propagates.

    Returns:
        ``(output, lse)``: output in ``out.dtype``, lse in ``lse.dtype``; new tensors.
    """
    acc = torch.float64 if torch.float64 in (out.dtype, lse.dtype) else torch.float32
    la, lb = lse.to(acc), lse_b.to(acc)
    l_new = torch.logaddexp(la, lb)
    ref = torch.where(torch.isneginf(l_new), torch.zeros_like(l_new), l_new)
    merged = out.to(acc) * torch.exp(la - ref).unsqueeze(-1)
    merged += out_b.to(acc) * torch.exp(lb - ref).unsqueeze(-1)
    return merged.to(out.dtype), l_new.to(lse.dtype)
