"""Adaptive precision: which heads may drop to 8 bits, and why.

Detects what this machine runs natively (and, without FP8 here, plans for an H100 described by
its device-property record), measures q/k/v statistics per head for four synthetic
heads — two of them with the channel outliers real models have (a few 20× query channels, a
large per-channel key offset) — and lets each precision policy choose per head, with the
predicted attention-output error and the reason for every decision.

    python examples/adaptive_precision.py
"""

from __future__ import annotations

import math

import torch
from adaattn_precision import (
    DeviceProperties,
    PrecisionPolicy,
    capability_from_properties,
    detect,
    select_precision,
    tensor_stats,
)

# What an H100 reports (sm 9.0, 132 SMs, 80 GB): the decisions it would get, on any machine.
H100 = DeviceProperties("NVIDIA H100 80GB HBM3", 9, 0, 132, 85_520_809_984)


def heads(seq: int = 512, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four heads: plain, plain, Q with 20× channels, K with a large channel offset."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, seq, dim, generator=gen) for _ in range(3))
    q[0, 2, :, :3] *= 20.0
    k[0, 3] += 10.0 * torch.randn(dim, generator=gen)
    return q, k, v


def main() -> None:
    here = detect()
    print(f"this machine: {here.name}, native fp8 e4m3: {here.fp8_e4m3}")
    capability = here if here.fp8_e4m3 else capability_from_properties(H100)
    print(f"decisions below are for: {capability.name}")
    q, k, v = heads()
    stats = [tensor_stats(t) for t in (q, k, v)]
    for name in ("quality", "balanced", "speed"):
        policy = PrecisionPolicy.preset(name)
        plan = select_precision(*stats, policy, capability, scale=1 / math.sqrt(q.shape[-1]))
        print(f"\npolicy {name!r} (tolerance {policy.tolerance}):")
        for h, (prec, reason) in enumerate(zip(plan.precisions, plan.reasons)):
            print(f"  head {h}: {prec:>9}  {reason}")


if __name__ == "__main__":
    main()
