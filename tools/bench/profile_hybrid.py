"""Where the hybrid forward spends its time: pooling vs attention kernel, per tile config.

    python -m tools.bench.profile_hybrid [--seq 8192] [--heads 16]

For each head dim (64/128) and causal mode, on one GPU and in one process, times (median of
CUDA-event runs via triton's do_bench):

* ``dense``: ``adaattn_kernels.attention`` (all heads exact);
* ``hybrid``: :func:`adaattn_kernels.hybrid.hybrid_attention`, every head hybrid
  (w=512, sinks=4, r=seq/64), autotuned;
* ``pool``: the far-field pooling kernel alone (``build_far_field``);
* ``mixed_side_stream`` / ``mixed_one_stream``: the half/half plan with its dense launch on a
  side stream (the default) and on the caller's stream;
* ``fwd[BMxBN,w,s]``: the attention kernel alone, once per candidate tile config (or per
  ``--tiles`` config);

each also replayed from a CUDA graph (``*graph_ms``: GPU time without host launch cost); and
the key tiles a query block visits (window + pooled + sinks) against the dense kernel's, so
the measured ratio can be read against the work ratio. Prints a table; writes
``$ADAATTN_RESULTS/profile_hybrid.json``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from tools.bench.common import graph_ms, host_us, median_ms, write_results

WINDOW = 512
SINKS = 4


def _work_ratio(seq: int, causal: bool, block_m: int, block_n: int) -> float:
    """Dense key columns per query block over hybrid ones (tile-rounded), averaged over blocks."""
    seg = 64
    dense = hybrid = 0.0
    for start in range(0, seq, block_m):
        last = start + block_m - 1
        hi = last + 1 if causal else seq
        dense += math.ceil(hi / block_n) * block_n
        if causal:
            lo = max(start + 1 - WINDOW, 0)
        else:
            lo = max(min(start - WINDOW // 2, seq - WINDOW), 0)
            hi = min(max(last - WINDOW // 2, 0) + WINDOW, seq)
        window = (math.ceil(hi / block_n) - lo // block_n) * block_n
        pooled = math.ceil(math.ceil(seq / seg) / block_n) * block_n
        hybrid += window + pooled + block_n  # + one sink tile
    return dense / hybrid


def run_case(
    seq: int,
    d: int,
    causal: bool,
    heads: int,
    order_exact_first: bool = False,
    tiles: tuple[tuple[int, int, int, int], ...] = (),
) -> dict[str, Any]:
    import adaattn_kernels
    from adaattn_kernels._triton import clear_replays
    from adaattn_kernels.hybrid import HybridPlan, build_far_field, hybrid_attention
    from adaattn_kernels.hybrid import _kernels as hk

    g = torch.Generator(device="cuda").manual_seed(seq + d)
    mk = lambda: torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(), mk(), mk()
    plan = HybridPlan.uniform(
        1, heads, seq_len_k=seq, window=WINDOW, rank=seq // 64, sinks=SINKS, device="cuda"
    )
    row: dict[str, Any] = {"seq": seq, "head_dim": d, "causal": causal, "heads": heads}
    row["dense_ms"] = median_ms(lambda: adaattn_kernels.attention(q, k, v, causal=causal))
    row["dense_graph_ms"] = graph_ms(lambda: adaattn_kernels.attention(q, k, v, causal=causal))
    tiles = tiles or hk.FWD_TILES
    tuner = hk._hybrid_fwd_kernel
    if order_exact_first:  # bench_hybrid's order: the all-exact plan autotunes first
        exact = HybridPlan.exact(1, heads, device="cuda")
        hybrid_attention(q, k, v, exact, causal=causal)
        row["exact_plan_config"] = str(tuner.best_config)
    ref = hybrid_attention(q, k, v, plan, causal=causal)
    assert isinstance(ref, torch.Tensor)
    # What the autotuner measured for each candidate (kernel alone), and what it chose.
    row["autotune_choice"] = str(tuner.best_config)
    row["autotune_timings_ms"] = {
        str(c): [float(x) for x in t] if isinstance(t, (list, tuple)) else float(t)
        for c, t in (getattr(tuner, "configs_timings", None) or {}).items()
    }
    row["hybrid_ms"] = median_ms(lambda: hybrid_attention(q, k, v, plan, causal=causal))
    row["hybrid_ms_again"] = median_ms(lambda: hybrid_attention(q, k, v, plan, causal=causal))
    row["host_us_per_call"] = host_us(lambda: hybrid_attention(q, k, v, plan, causal=causal))
    row["pool_ms"] = median_ms(lambda: build_far_field(k, v, plan))
    row["pool_graph_ms"] = graph_ms(lambda: build_far_field(k, v, plan))
    row.update(_mixed_streams(q, k, v, causal))
    row["hybrid_graph_ms"] = graph_ms(lambda: hybrid_attention(q, k, v, plan, causal=causal))
    all_configs = list(tuner.configs)
    import triton

    try:
        for bm, bn, w, st in tiles:
            name = f"fwd[{bm}x{bn},w{w},s{st}]"
            tuner.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w,
                                           num_stages=st)]  # fmt: skip
            tuner.cache.clear()
            clear_replays()  # else the launcher replays the previous config's binary
            try:
                out = hybrid_attention(q, k, v, plan, causal=causal)
                assert isinstance(out, torch.Tensor)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                row[name] = {
                    "ms_incl_pool": median_ms(
                        lambda: hybrid_attention(q, k, v, plan, causal=causal)
                    ),
                    "graph_ms_incl_pool": graph_ms(
                        lambda: hybrid_attention(q, k, v, plan, causal=causal)
                    ),
                    "rel_diff_vs_autotuned": err,
                    "work_ratio_dense_over_hybrid": _work_ratio(seq, causal, bm, bn),
                }
            except Exception as e:  # a config that fails to compile is reported, not fatal
                row[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        tuner.configs = all_configs
        tuner.cache.clear()
        clear_replays()
    row["speedup"] = row["dense_ms"] / row["hybrid_ms"]
    return row


def _mixed_streams(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> dict[str, Any]:
    """Half/half plan with its dense launch on a side stream (the default) vs one stream."""
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention
    from adaattn_kernels.hybrid import op as hop

    heads, seq = q.shape[1], k.shape[2]
    mixed = HybridPlan.build(
        1, heads, seq_len_k=seq, window=WINDOW, rank=seq // 64, sinks=SINKS,
        exact=(torch.arange(heads) % 2 == 0)[None, :], device="cuda",
    )  # fmt: skip
    fn = lambda: hybrid_attention(q, k, v, mixed, causal=causal)
    side_stream = hop._side_stream
    out: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    try:
        for name, pick in (("side_stream", side_stream), ("one_stream", lambda t: None)):
            hop._side_stream = pick
            outputs[name] = fn()
            out[f"mixed_{name}_ms"] = median_ms(fn)
            out[f"mixed_{name}_graph_ms"] = graph_ms(fn)
    finally:
        hop._side_stream = side_stream
    same = torch.equal(outputs["side_stream"], outputs["one_stream"])
    out["mixed_streams_identical"] = bool(same)
    return out


def _ncu_target(seq: int, heads: int) -> None:
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention

    q, k, v = (
        torch.randn(1, heads, seq, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    plan = HybridPlan.uniform(
        1, heads, seq_len_k=seq, window=WINDOW, rank=seq // 64, sinks=SINKS, device="cuda"
    )
    for _ in range(3):  # compile and autotune outside the profiled range
        hybrid_attention(q, k, v, plan, causal=True)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("target")
    hybrid_attention(q, k, v, plan, causal=True)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument(
        "--exact-first",
        action="store_true",
        help="autotune the all-exact plan before the hybrid one (bench_hybrid's order)",
    )
    ap.add_argument(
        "--ncu",
        action="store_true",
        help="one hybrid call (head_dim 64, causal) inside the NVTX range 'target', for "
        "`ncu --nvtx --nvtx-include target/`",
    )
    ap.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        help="tile configs to time instead of the autotuner's, as BM,BN,warps,stages",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_hybrid needs a CUDA GPU")
    tiles = tuple(tuple(int(x) for x in t.split(",")) for t in args.tiles)
    if args.ncu:
        _ncu_target(args.seq, args.heads)
        return
    rows = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    for d in args.head_dims:
        for causal in causals:
            row = run_case(args.seq, d, causal, args.heads, args.exact_first, tiles)  # type: ignore[arg-type]
            print(
                f"seq={args.seq} d={d} causal={causal!s:5} dense={row['dense_ms']:.3f} "
                f"hybrid={row['hybrid_ms']:.3f} pool={row['pool_ms']:.3f} | graph: dense="
                f"{row['dense_graph_ms']:.3f} hybrid={row['hybrid_graph_ms']:.3f} "
                f"pool={row['pool_graph_ms']:.3f} mixed side/one stream="
                f"{row['mixed_side_stream_graph_ms']:.3f}/{row['mixed_one_stream_graph_ms']:.3f} | "
                f"speedup={row['speedup']:.2f} again={row['hybrid_ms_again']:.3f} "
                f"host={row['host_us_per_call']:.0f}us "
                f"chose={row['autotune_choice']} tuner={row['autotune_timings_ms']}",
                flush=True,
            )
            for name, val in row.items():
                if name.startswith("fwd["):
                    print(f"    {name}: {val}", flush=True)
            rows.append(row)
            write_results("profile_hybrid", rows, partial=True)
    write_results("profile_hybrid", rows)


if __name__ == "__main__":
    main()
