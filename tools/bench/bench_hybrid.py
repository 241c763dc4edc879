"""Hybrid (exact near field + pooled far field) attention vs dense exact kernels, one run.

    python -m tools.bench.bench_hybrid [--quick]

For each sequence length (8k/16k/32k), head dim (64/128) and causal mode, on one GPU and in one
process, times each of these two ways — eager calls (median of CUDA-event runs via triton's
``do_bench``; includes the host's launch work whenever it outlasts the GPU work, as a Python
caller sees it) and replays of a CUDA graph (``*_graph_ms``: GPU time alone):

* ``dense``: ``adaattn_kernels.attention`` (Triton FlashAttention-2, all heads exact);
* ``sdpa_cudnn``: ``torch.nn.functional.scaled_dot_product_attention`` on the cuDNN backend;
* ``plan_exact``: the hybrid kernel with every head exact;
* ``plan_hybrid``: every head hybrid(w=512, sinks=4, r=seq/64);
* ``plan_mixed``: even heads exact, odd heads hybrid, one launch.

Acceptance (issue 7): ``dense / plan_hybrid ≥ 4`` and ``plan_mixed / plan_exact ≤ 0.6`` (also
reported against ``dense``), judged on the eager times; the graph times give the same ratios
for the kernels alone. Writes ``results/hybrid.json`` (or ``$ADAATTN_RESULTS/hybrid.json``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

from tools.bench.common import graph_ms, median_ms, rel_error, write_results

WINDOW = 512
SINKS = 4


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def run_case(seq: int, d: int, causal: bool, heads: int, dtype: torch.dtype) -> dict[str, Any]:
    import adaattn_kernels
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention

    g = torch.Generator(device="cuda").manual_seed(seq + d)
    mk = lambda: torch.randn(1, heads, seq, d, device="cuda", dtype=dtype, generator=g)
    q, k, v = mk(), mk(), mk()
    rank = seq // 64
    hybrid = HybridPlan.uniform(1, heads, seq_len_k=seq, window=WINDOW, rank=rank, sinks=SINKS,
                                device="cuda")  # fmt: skip
    exact = HybridPlan.exact(1, heads, device="cuda")
    mixed_mask = (torch.arange(heads) % 2 == 0)[None, :]
    mixed = HybridPlan.build(1, heads, seq_len_k=seq, window=WINDOW, rank=rank, sinks=SINKS,
                             exact=mixed_mask, device="cuda")  # fmt: skip

    row: dict[str, Any] = {
        "seq": seq, "head_dim": d, "causal": causal, "heads": heads, "batch": 1,
        "dtype": str(dtype).replace("torch.", ""), "window": WINDOW, "sinks": SINKS, "rank": rank,
        "segment": math.ceil(seq / rank),
    }  # fmt: skip
    fns = {
        "dense": lambda: adaattn_kernels.attention(q, k, v, causal=causal),
        "plan_exact": lambda: hybrid_attention(q, k, v, exact, causal=causal),
        "plan_hybrid": lambda: hybrid_attention(q, k, v, hybrid, causal=causal),
        "plan_mixed": lambda: hybrid_attention(q, k, v, mixed, causal=causal),
        "sdpa_cudnn": _sdpa_cudnn(q, k, v, causal),
    }
    from adaattn_kernels.hybrid._kernels import _hybrid_fwd_kernel

    outs: dict[str, torch.Tensor] = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn()
            torch.cuda.synchronize()
            if name.startswith("plan_"):  # the tile the autotuner chose for this plan kind
                row[f"{name}_config"] = str(getattr(_hybrid_fwd_kernel, "best_config", None))
            row[f"{name}_ms"] = median_ms(fn, warmup=10, rep=40)
            row[f"{name}_graph_ms"] = graph_ms(fn)
        except Exception as err:
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]
    # Correctness spot checks in the same run: exact heads must match the dense kernel.
    if "dense" in outs and "plan_exact" in outs:
        row["plan_exact_vs_dense_rel_err"] = rel_error(outs["plan_exact"], outs["dense"])
    if "dense" in outs and "plan_mixed" in outs:
        ex = mixed_mask[0].nonzero().squeeze(1).cuda()
        row["mixed_exact_heads_vs_dense_rel_err"] = rel_error(
            outs["plan_mixed"][:, ex], outs["dense"][:, ex]
        )
        row["hybrid_vs_dense_rel_err"] = rel_error(outs["plan_hybrid"], outs["dense"])
    dense, ex_ms = row.get("dense_ms"), row.get("plan_exact_ms")
    hyb, mix = row.get("plan_hybrid_ms"), row.get("plan_mixed_ms")
    if dense and hyb:
        row["speedup_hybrid_vs_dense"] = dense / hyb
    if ex_ms and hyb:
        row["speedup_hybrid_vs_plan_exact"] = ex_ms / hyb
    if ex_ms and mix:
        row["mixed_over_plan_exact"] = mix / ex_ms
    if dense and mix:
        row["mixed_over_dense"] = mix / dense
    gd, ge, gh, gm = (row.get(f"{n}_graph_ms") for n in ("dense", "plan_exact", "plan_hybrid",
                                                           "plan_mixed"))  # fmt: skip
    if gd and ge and gh and gm:
        row["graph_speedup_hybrid_vs_dense"] = gd / gh
        row["graph_mixed_over_plan_exact"] = gm / ge
    row["pass_speedup_4x"] = bool(dense and hyb and dense / hyb >= 4.0)
    row["pass_mixed_0p6"] = bool(ex_ms and mix and dense and max(mix / ex_ms, mix / dense) <= 0.6)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8k only (smoke run)")
    ap.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_hybrid needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    seqs = args.seqs or ([8192] if args.quick else [8192, 16384, 32768])
    rows = []
    for seq in seqs:
        for d in (64, 128):
            for causal in (False, True):
                row = run_case(seq, d, causal, args.heads, dtype)
                print(
                    f"seq={seq:6d} d={d:3d} causal={causal!s:5} "
                    + " ".join(
                        f"{n}={row.get(n + '_ms') or float('nan'):.3f}ms"
                        for n in ("dense", "sdpa_cudnn", "plan_exact", "plan_hybrid", "plan_mixed")
                    )
                    + f" speedup={row.get('speedup_hybrid_vs_dense', float('nan')):.2f}x"
                    + f" mixed/exact={row.get('mixed_over_plan_exact', float('nan')):.3f}"
                    + f" | graph: {row.get('graph_speedup_hybrid_vs_dense', float('nan')):.2f}x"
                    + f" mixed/exact={row.get('graph_mixed_over_plan_exact', float('nan')):.3f}",
                    flush=True,
                )
                rows.append(row)
                write_results("hybrid", rows, partial=True)  # keep what ran if time runs out
                torch.cuda.empty_cache()
    write_results(
        "hybrid",
        rows,
        acceptance={
            "speedup_hybrid_vs_dense_min": 4.0,
            "mixed_over_all_exact_max": 0.6,
            "all_pass_speedup": all(r["pass_speedup_4x"] for r in rows),
            "all_pass_mixed": all(r["pass_mixed_0p6"] for r in rows),
        },
    )


if __name__ == "__main__":
    main()
