"""Synthetic attention inputs whose heads have known structure (for examples, tests, docs).

Real attention heads fall into a few recognisable kinds (Clark et al. 2019, "What Does BERT
Look At?"; Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"):
heads that attend to *nearby* tokens, heads that dump their attention on the first token
(*sinks*), *diffuse* heads averaging broadly, and *content* heads. :func:`structured_qkv`
builds ``q``, ``k``, ``v`` with one such kind per head, so the effect of a head's structure on
entropy, rank and the planner's choices can be seen without downloading a model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HEAD_KINDS", "structured_qkv"]

#: Head kinds :func:`structured_qkv` can build.
HEAD_KINDS: tuple[str, ...] = ("local", "sink", "diffuse", "content")


def _rope_features(seq: int, dim: int, base: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm rotary position features ``(seq, dim)``: ``f_i · f_j`` decays with ``|i − j|``."""
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    phase = torch.rand(half, generator=gen, dtype=torch.float64) * 2 * math.pi
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :] + phase
    return torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(half)


def structured_qkv(
    kinds: tuple[str, ...] | list[str] = ("local", "sink", "diffuse", "content"),
    *,
    batch: int = 1,
    seq_len: int = 256,
    head_dim: int = 64,
    sharpness: float = 12.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``q``, ``k``, ``v`` of shape ``(batch, len(kinds), seq_len, head_dim)``.

    Kinds (one per head):

    * ``"local"``: ``q_i = k_i = a·f_i`` with rotary features ``f`` whose dot products peak at
      ``i = j``, so each query attends a few neighbours (low entropy, a band of weight).
    * ``"sink"``: every query is aligned with key 0, which takes a large share of the weight.
    * ``"diffuse"``: small random queries, so weights are nearly uniform (high entropy).
    * ``"content"``: i.i.d. Gaussian queries and keys at the usual ``1/√d`` scale.

    Args:
        kinds: Kind of each head, from :data:`HEAD_KINDS`.
        batch: Batch size (≥ 1).
        seq_len: Sequence length (≥ 2).
        head_dim: Head dimension (even, ≥ 4).
        sharpness: Score scale of the local and sink heads (higher: more peaked).
        seed: Seed of every random draw.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``(q, k, v)``; ``v`` is standard normal.

    Raises:
        ValueError: unknown kind, or a size out of range.
    """
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one head kind")
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose from {HEAD_KINDS}")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch must be >= 1 and seq_len >= 2, got {batch} and {seq_len}")
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 4, got {head_dim}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    gen = torch.Generator().manual_seed(seed)
    root = math.sqrt(head_dim)
    qs, ks = [], []
    for kind in kinds:
        if kind == "local":
            f = _rope_features(seq_len, head_dim, 64.0, gen) * math.sqrt(sharpness * root)
            f = f.expand(batch, seq_len, head_dim)
            qs.append(f)
            ks.append(f)
        elif kind == "sink":
            k = torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64) * 0.3
            direction = torch.randn(head_dim, generator=gen, dtype=torch.float64)
            direction /= direction.norm()
            # score of key 0: sharpness/2 after the 1/√d scale, e^(sharpness/2) vs ~seq others
            k[:, 0] = direction * math.sqrt(0.5 * sharpness * root)
            q = torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64) * 0.3
            q += direction * math.sqrt(0.5 * sharpness * root)
            qs.append(q)
            ks.append(k)
        elif kind == "diffuse":
            qs.append(
                torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64) * 0.1
            )
            ks.append(torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64))
        else:
            qs.append(torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64))
            ks.append(torch.randn(batch, seq_len, head_dim, generator=gen, dtype=torch.float64))
    q = torch.stack(qs, dim=1)
    k = torch.stack(ks, dim=1)
    v = torch.randn(batch, len(kinds), seq_len, head_dim, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))  # type: ignore[return-value]
