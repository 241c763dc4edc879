"""Launch parameters of the far-field pooling kernel: warps and rows per step, by GPU time.

    python -m tools.bench.profile_pool [--seqs 8192 32768] [--heads 16]

Times ``adaattn_kernels.hybrid._kernels._pool_kernel`` (segment 64, bf16, every head hybrid)
for each (BLOCK_J, num_warps) by CUDA-graph replay, checks each output against
``torch.mean`` of the segments, and reports the effective bandwidth (K and V read once).
Writes ``$ADAATTN_RESULTS/profile_pool.json``; ``hybrid/op.py`` takes its ``_POOL_WARPS`` from
these numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from tools.bench.common import graph_ms, write_results

SEGMENT = 64


def run_case(seq: int, d: int, heads: int) -> dict[str, Any]:
    from adaattn_kernels.hybrid._kernels import _pool_kernel

    g = torch.Generator(device="cuda").manual_seed(seq + d)
    k, v = (
        torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(2)
    )
    nseg = seq // SEGMENT
    segment = torch.full((heads,), SEGMENT, dtype=torch.int32, device="cuda")
    kp = torch.empty(1, heads, nseg, d, device="cuda", dtype=torch.bfloat16)
    vp = torch.empty_like(kp)
    ref_k = k.view(1, heads, nseg, SEGMENT, d).float().mean(3)
    ref_v = v.view(1, heads, nseg, SEGMENT, d).float().mean(3)
    gbytes = 2 * k.numel() * k.element_size() / 1e9
    row: dict[str, Any] = {"seq": seq, "head_dim": d, "heads": heads, "segment": SEGMENT}
    for block_j in (32, 64):
        for warps in (2, 4, 8):

            def launch(bj: int = block_j, w: int = warps) -> None:
                _pool_kernel[(nseg, heads)](
                    k, v, kp, vp, segment,
                    k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2),
                    heads, 1, seq, nseg,
                    HEAD_DIM=d, BLOCK_J=bj, num_warps=w,
                )  # fmt: skip

            launch()
            torch.cuda.synchronize()
            # bf16 storage of a mean of N(0,1) values: |err| <= 2^-9 * |mean| + accumulation.
            ok = torch.allclose(kp.float(), ref_k, atol=1e-2) and torch.allclose(
                vp.float(), ref_v, atol=1e-2
            )
            ms = graph_ms(launch)
            row[f"bj{block_j}_w{warps}"] = {
                "us": None if ms is None else ms * 1e3,
                "gb_per_s": None if ms is None else gbytes / (ms / 1e3),
                "matches_mean": bool(ok),
            }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_pool needs a CUDA GPU")
    rows = []
    for seq in args.seqs:
        for d in (64, 128):
            row = run_case(seq, d, args.heads)
            cells = [
                f"{n}={c['us']:.1f}us({c['gb_per_s']:.0f}GB/s{'' if c['matches_mean'] else ',BAD'})"
                for n, c in row.items()
                if isinstance(c, dict) and c["us"] is not None
            ]
            print(f"seq={seq} d={d}: " + "  ".join(cells), flush=True)
            rows.append(row)
    write_results("profile_pool", rows)


if __name__ == "__main__":
    main()
