"""Adaptive rank: exact near field + pooled low-rank far field, a plan per head.

Builds four synthetic heads (local, attention-sink, diffuse, content-addressed), runs the hybrid
kernel with one plan for all of them (window 64, 4 sinks, 32 pooled far-field segments), and
compares, per head, the true relative error against exact attention with the error the planner
would see: the same plan measured on 256 sampled query rows. Diffuse and local heads pool well;
the content-addressed head does not, and the planner would keep it exact.

    python examples/adaptive_rank.py
"""

from __future__ import annotations

import torch
from adaattn.synthetic import structured_qkv
from adaattn_kernels import HybridPlan, attention, estimate_hybrid_error, hybrid_attention

KINDS = ("local", "sink", "diffuse", "content")


def main() -> None:
    q, k, v = structured_qkv(KINDS, seq_len=1024, seed=0)
    plan = HybridPlan.uniform(1, len(KINDS), seq_len_k=1024, window=64, rank=32, sinks=4)
    exact = attention(q, k, v, causal=True)
    hybrid = hybrid_attention(q, k, v, plan, causal=True)
    assert isinstance(exact, torch.Tensor)
    assert isinstance(hybrid, torch.Tensor)
    true = ((hybrid - exact).flatten(2).norm(dim=-1) / exact.flatten(2).norm(dim=-1))[0]
    gen = torch.Generator().manual_seed(0)
    sampled = estimate_hybrid_error(q, k, v, plan, causal=True, num_samples=256, generator=gen)[0]
    print(f"{'head':>8} {'true error':>11} {'sampled estimate':>17}")
    for kind, t, s in zip(KINDS, true.tolist(), sampled.tolist()):
        print(f"{kind:>8} {t:11.2e} {s:17.2e}")


if __name__ == "__main__":
    main()
