"""One forward launch of a chosen attention kernel inside an NVTX range, for Nsight Compute.

    ncu --nvtx --nvtx-include "target/" --clock-control none --section SpeedOfLight \\
        python -m tools.bench.profile_flash --method ours --head-dim 128 --seq 8192

``--method``: ``ours`` (``adaattn_kernels.attention``), ``cudnn`` / ``flash`` (SDPA backends).
The call runs three times first (compilation, autotuning) outside the range; only the fourth,
inside ``target``, is profiled. Shapes follow the benchmark grid: batch·seq = 16k tokens,
heads·head_dim = 2048, bf16.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("ours", "cudnn", "flash"), default="ours")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    s, d = args.seq, args.head_dim
    b, h = max(1, 16384 // s), 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn: Callable[[], torch.Tensor]
    if args.method == "ours":
        import adaattn_kernels

        def fn() -> torch.Tensor:
            return adaattn_kernels.attention(q, k, v, causal=args.causal)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}

        def fn() -> torch.Tensor:
            with sdpa_kernel([backend[args.method]]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("target")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
