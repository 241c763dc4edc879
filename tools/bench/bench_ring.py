"""Benchmark context-parallel ring attention on N GPUs against the dense single-GPU kernel.

Run from the repository root on a machine with N ≥ 2 GPUs (one process per GPU, NCCL)::

    torchrun --nproc-per-node 2 -m tools.bench.bench_ring             # seq 32k, 64k, 128k
    torchrun --nproc-per-node 2 -m tools.bench.bench_ring --quick     # seq 32k only
    torchrun --nproc-per-node 8 -m tools.bench.bench_ring --seqs 131072 262144
    torchrun --nproc-per-node 2 -m tools.bench.bench_ring --hybrid    # hybrid plans, forward

Grid: total sequence ``S`` (default 32k–128k tokens), bf16, head_dim 128, batch 1, 16 query
heads over ``--kv-heads`` key/value heads (default 16; fewer for GQA), causal and not, layout
zig-zag (``--layouts zigzag contiguous`` adds the unbalanced split). Each rank holds ``S/N``
tokens of q, k, v.

Throughput per GPU counts the whole problem's FLOPs — ``4·B·H·S²·D`` for the forward, halved
when causal, and 2.5× that for the backward, as in ``bench_flash`` — divided by ``N`` and by
the median over the timed calls of the slowest rank's time per call (CUDA events, the ranks
started together after a barrier; the backward is the median forward+backward time minus the
median forward time). Ring and baseline are timed in alternation, ``--rounds`` times each
(default 2), and each figure is the mean of its rounds' medians: the cards' clocks drift by
several percent within a minute, and alternating spreads the drift over both. The
baseline is the dense kernel (``adaattn_kernels.attention``) on each GPU alone with *the same
per-GPU work*: the full sequence ``S`` with ``H/N`` query heads (and ``Hkv/N`` key/value heads,
at least 1), no communication. ``efficiency = ring / dense`` per-GPU TFLOP/s: what the ring's
communication, the merges and the smaller blocks cost. Every case checks the ring's output and
gradients on this rank's shard against the dense kernel on the full sequence (``--no-check``
skips it). Rank 0 writes ``results/ring.json`` (``ADAATTN_RESULTS`` moves it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from tools.bench.common import rel_error, write_results

if TYPE_CHECKING:
    from adaattn.distributed import Layout

HEADS = 16
HEAD_DIM = 128
DEVICE = torch.device("cuda")  # --cpu: a gloo smoke run of the script on CPU
COMM_PRIORITY: Literal["high", "group"] = "high"  # --comm-priority
HYBRID_KV: Literal["gather", "halo"] = "gather"  # --hybrid-kv


def _time_ms(fn: Callable[[], Any], *, warmup: int, reps: int) -> float:
    """Median ms of one call over ``reps`` calls, each the slowest rank's; ranks start together."""
    for _ in range(warmup):
        fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    times = []
    if DEVICE.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for i in range(reps):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize()
        times = [events[i].elapsed_time(events[i + 1]) for i in range(reps)]
    else:  # --cpu smoke run
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor(times, dtype=torch.float64, device=DEVICE)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.median().item())


def _fwd_bwd_ms(
    attn: Callable[..., Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    warmup: int,
    reps: int,
) -> tuple[float, float]:
    """(forward ms, backward ms); the backward is (forward + backward) − forward."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    with torch.no_grad():
        fwd = _time_ms(lambda: attn(*leaves), warmup=warmup, reps=reps)

    def step() -> None:
        torch.autograd.grad(attn(*leaves), leaves, do)

    both = _time_ms(step, warmup=warmup, reps=reps)
    return fwd, max(both - fwd, 0.0)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    *,
    causal: bool,
    layout: Layout,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Relative errors of the ring's output and gradients vs the dense kernel, this rank's shard."""
    import adaattn_kernels
    from adaattn.distributed import ring_attention, shard_sequence

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, rank, world, layout=layout)

    full = [t.detach().requires_grad_() for t in (q, k, v)]
    out = adaattn_kernels.attention(*full, causal=causal)
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out, full, do)
    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    out_l = ring_attention(*local, causal=causal, layout=layout, comm_priority=COMM_PRIORITY)
    assert isinstance(out_l, torch.Tensor)
    grads_l = torch.autograd.grad(out_l, local, shard(do))
    errs = {"rel_err_out_vs_dense": rel_error(out_l, shard(out))}
    for name, g_l, g in zip(("dq", "dk", "dv"), grads_l, grads):
        errs[f"rel_err_{name}_vs_dense"] = rel_error(g_l, shard(g))
    worst = torch.tensor(list(errs.values()), dtype=torch.float64, device=DEVICE)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(errs, worst.tolist()))


def run_case(
    seq: int,
    causal: bool,
    layout: Layout,
    *,
    kv_heads: int,
    rank: int,
    world: int,
    check: bool,
    warmup: int,
    reps: int,
    rounds: int = 2,
) -> list[dict[str, Any]]:
    import adaattn_kernels
    from adaattn.distributed import ring_attention, shard_sequence

    gen = torch.Generator(device=DEVICE).manual_seed(seq + int(causal))  # same on every rank
    shape_q, shape_kv = (1, HEADS, seq, HEAD_DIM), (1, kv_heads, seq, HEAD_DIM)
    q = torch.randn(shape_q, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(shape_kv, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(shape_kv, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    do = torch.randn(shape_q, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    flops_per_gpu = 4.0 * HEADS * seq * seq * HEAD_DIM * (0.5 if causal else 1.0) / world
    base = {
        "world": world,
        "seq": seq,
        "seq_per_gpu": seq // world,
        "heads": HEADS,
        "kv_heads": kv_heads,
        "head_dim": HEAD_DIM,
        "causal": causal,
        "layout": layout,
        "flops_per_gpu_fwd": flops_per_gpu,
    }
    rows: list[dict[str, Any]] = []

    # Ring attention over the N GPUs.
    ring_row: dict[str, Any] = {"method": "ring", **base}
    if check:
        ring_row.update(_check(q, k, v, do, causal=causal, layout=layout, rank=rank, world=world))
    local = [shard_sequence(t, rank, world, layout=layout) for t in (q, k, v)]
    rows.append(ring_row)

    # The dense kernel on each GPU alone, the same work: full sequence, H/N query heads.
    dense_row: dict[str, Any] = {"method": "dense_single_gpu", **base}
    hq, hkv = HEADS // world, max(1, kv_heads // world)
    dense_row.update({"heads": hq, "kv_heads": hkv})
    dense_in = [t[:, :h].contiguous() for t, h in ((q, hq), (k, hkv), (v, hkv))]
    rows.append(dense_row)

    def ring_call(*t: torch.Tensor) -> Any:
        return ring_attention(*t, causal=causal, layout=layout, comm_priority=COMM_PRIORITY)

    def dense_call(*t: torch.Tensor) -> Any:
        return adaattn_kernels.attention(*t, causal=causal)

    # Ring and dense alternate for ``rounds`` rounds; each figure is the mean of its rounds'
    # medians, so a drift of the cards' clocks during the case weighs on both alike.
    timed: dict[str, list[tuple[float, float]]] = {"ring": [], "dense": []}
    for _ in range(rounds):
        timed["ring"].append(_fwd_bwd_ms(ring_call, *local, warmup=warmup, reps=reps))
        timed["dense"].append(_fwd_bwd_ms(dense_call, *dense_in, warmup=warmup, reps=reps))
    fwd, bwd = (sum(x) / rounds for x in zip(*timed["ring"]))
    dfwd, dbwd = (sum(x) / rounds for x in zip(*timed["dense"]))
    ring_row["fwd_ms_rounds"] = [f for f, _ in timed["ring"]]
    dense_row["fwd_ms_rounds"] = [f for f, _ in timed["dense"]]

    for row, (f, b) in ((ring_row, (fwd, bwd)), (dense_row, (dfwd, dbwd))):
        row["fwd_ms"], row["bwd_ms"] = f, b
        row["fwd_tflops_per_gpu"] = flops_per_gpu / f * 1e-9
        row["bwd_tflops_per_gpu"] = 2.5 * flops_per_gpu / b * 1e-9 if b > 0 else None
    ring_row["fwd_efficiency_vs_dense"] = (
        ring_row["fwd_tflops_per_gpu"] / dense_row["fwd_tflops_per_gpu"]
    )
    if ring_row["bwd_tflops_per_gpu"] and dense_row["bwd_tflops_per_gpu"]:
        ring_row["bwd_efficiency_vs_dense"] = (
            ring_row["bwd_tflops_per_gpu"] / dense_row["bwd_tflops_per_gpu"]
        )
    return rows


def _profile(
    seq: int,
    causal: bool,
    layout: Layout,
    *,
    kv_heads: int,
    rank: int,
    world: int,
    trace: str | None = None,
) -> None:
    """GPU time per kernel (torch.profiler) of two ring forward+backward calls; rank 0 prints."""
    from adaattn.distributed import ring_attention
    from torch.profiler import ProfilerActivity, profile

    s_local = seq // world
    gen = torch.Generator(device=DEVICE).manual_seed(rank)
    q, k, v, do = (
        torch.randn(1, h, s_local, HEAD_DIM, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        for h in (HEADS, kv_heads, kv_heads, HEADS)
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def step() -> None:
        out = ring_attention(*leaves, causal=causal, layout=layout, comm_priority=COMM_PRIORITY)
        torch.autograd.grad(out, leaves, do)

    cuda = DEVICE.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()
    sync()
    dist.barrier()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync()
    if trace:
        os.makedirs(trace, exist_ok=True)
        name = f"ring_{seq}_{'causal' if causal else 'full'}_{layout}_rank{rank}.json"
        prof.export_chrome_trace(os.path.join(trace, name))
    if rank == 0:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=14)
        print(f"profile: seq {seq} causal {causal} {layout}, 2 calls, rank 0\n{table}", flush=True)


def run_hybrid_case(
    seq: int, layout: Layout, *, kv_heads: int, rank: int, world: int, warmup: int, reps: int
) -> dict[str, Any]:
    """Causal forward with a hybrid plan (w = 512, 4 sinks, r = seq/64 on every head).

    Ring (keys/values all-gathered, one hybrid call per local chunk) against the hybrid kernel
    on one GPU with the same per-GPU work (the full sequence, H/N heads), and against the exact
    ring forward on the same shards. The output is checked against the hybrid kernel on the
    full sequence.
    """
    import adaattn_kernels
    from adaattn.distributed import ring_attention, shard_sequence
    from adaattn_kernels import HybridPlan

    gen = torch.Generator(device=DEVICE).manual_seed(seq + 7)
    q = torch.randn(1, HEADS, seq, HEAD_DIM, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    k, v = (
        torch.randn(1, kv_heads, seq, HEAD_DIM, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(2)
    )

    def plan_for(heads: int) -> HybridPlan:
        return HybridPlan.uniform(
            1, heads, seq_len_k=seq, window=512, rank=seq // 64, sinks=4, device=DEVICE
        )

    plan, hq, hkv = plan_for(HEADS), HEADS // world, max(1, kv_heads // world)
    local = [shard_sequence(t, rank, world, layout=layout) for t in (q, k, v)]
    single = [t[:, :h].contiguous() for t, h in ((q, hq), (k, hkv), (v, hkv))]
    plan_single = plan_for(hq)
    ring_kw: dict[str, Any] = {
        "causal": True,
        "layout": layout,
        "plan": plan,
        "hybrid_kv": HYBRID_KV,
    }
    with torch.no_grad():
        out_l = ring_attention(*local, **ring_kw)
        full = adaattn_kernels.hybrid_attention(q, k, v, plan, causal=True)
        err = torch.tensor(
            [rel_error(out_l, shard_sequence(full, rank, world, layout=layout))], device=DEVICE
        )
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        ms = {
            "ring_hybrid_ms": lambda: ring_attention(*local, **ring_kw),
            "single_gpu_hybrid_ms": lambda: adaattn_kernels.hybrid_attention(
                *single, plan_single, causal=True
            ),
            "ring_exact_ms": lambda: ring_attention(
                *local, causal=True, layout=layout, comm_priority=COMM_PRIORITY
            ),
        }
        row: dict[str, Any] = {
            "method": "ring_hybrid", "world": world, "seq": seq, "heads": HEADS,
            "kv_heads": kv_heads, "head_dim": HEAD_DIM, "causal": True, "layout": layout,
            "window": 512, "sinks": 4, "rank": seq // 64, "hybrid_kv": HYBRID_KV,
            "rel_err_out_vs_single_gpu_hybrid": float(err.item()),
        }  # fmt: skip
        for name, fn in ms.items():
            row[name] = _time_ms(fn, warmup=warmup, reps=reps)
    row["efficiency_vs_single_gpu_hybrid"] = row["single_gpu_hybrid_ms"] / row["ring_hybrid_ms"]
    row["speedup_vs_ring_exact"] = row["ring_exact_ms"] / row["ring_hybrid_ms"]
    return row


def _autotune_choices() -> dict[str, dict[str, str]]:
    """The configuration the dense kernels' autotuners chose per key in this process.

    Recorded with the results: a block shape tuned to a slower configuration (the timings of
    autotuning are noisy) explains a run's efficiency better than guesses do.
    """
    if DEVICE.type != "cuda":
        return {}
    from adaattn_kernels.flash import _triton_kernels as tk

    kernels = {"fwd": tk._fwd_kernel, "bwd_dkdv": tk._bwd_dkdv_kernel, "bwd_dq": tk._bwd_dq_kernel}
    return {
        name: {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
        for name, kernel in kernels.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 32k only")
    ap.add_argument("--seqs", type=int, nargs="*", help="total sequence lengths")
    ap.add_argument("--kv-heads", type=int, default=HEADS, help="key/value heads (GQA if < 16)")
    ap.add_argument("--layouts", nargs="*", default=["zigzag"], choices=["zigzag", "contiguous"])
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="rank 0 prints the GPU time per kernel of two ring forward+backward calls per case",
    )
    ap.add_argument(
        "--trace",
        metavar="DIR",
        help="with --profile: every rank writes its Chrome trace of the profiled calls to DIR",
    )
    ap.add_argument(
        "--comm-priority",
        choices=["high", "group"],
        default="high",
        help="ring_attention(comm_priority=...): transfers on a high-priority twin group or not",
    )
    ap.add_argument(
        "--hybrid",
        action="store_true",
        help="causal forward with a hybrid plan instead (results/ring_hybrid.json)",
    )
    ap.add_argument(
        "--hybrid-kv",
        default="gather",
        choices=["gather", "halo"],
        help="with --hybrid: how the ring reaches the plan's keys (ring_attention's hybrid_kv)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternating ring/dense timing rounds per case"
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="smoke-test the script on CPU over gloo (e.g. --cpu --seqs 256 --reps 1)",
    )
    args = ap.parse_args(argv)
    if "LOCAL_RANK" not in os.environ or not (args.cpu or torch.cuda.is_available()):
        print(
            "bench_ring needs torchrun and CUDA GPUs: "
            "torchrun --nproc-per-node 2 -m tools.bench.bench_ring",
            file=sys.stderr,
        )
        return 1
    global DEVICE, COMM_PRIORITY, HYBRID_KV
    COMM_PRIORITY = args.comm_priority
    HYBRID_KV = args.hybrid_kv
    if args.cpu:
        DEVICE = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if HEADS % world:
        print(f"the dense baseline splits {HEADS} heads over {world} GPUs", file=sys.stderr)
        return 1
    seqs = args.seqs or ([32768] if args.quick else [32768, 65536, 131072])
    rows: list[dict[str, Any]] = []
    nccl_env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))}
    extra = {
        "world": world,
        "kv_heads": args.kv_heads,
        "smoke_cpu": args.cpu,
        "comm_priority": args.comm_priority,
        "nccl_env": nccl_env,
    }
    layouts: list[Layout] = args.layouts
    if args.hybrid:
        hybrid_rows = []
        for seq in seqs:
            row = run_hybrid_case(
                seq, layouts[0], kv_heads=args.kv_heads, rank=rank, world=world,
                warmup=args.warmup, reps=args.reps,
            )  # fmt: skip
            hybrid_rows.append(row)
            if rank == 0:
                print(
                    f"seq {seq} hybrid ring {row['ring_hybrid_ms']:.3f} ms, one GPU "
                    f"{row['single_gpu_hybrid_ms']:.3f} ms (efficiency "
                    f"{row['efficiency_vs_single_gpu_hybrid']:.2f}), exact ring "
                    f"{row['ring_exact_ms']:.3f} ms, "
                    f"error {row['rel_err_out_vs_single_gpu_hybrid']:.1e}",
                    flush=True,
                )
        if rank == 0:
            name = "ring_hybrid" if args.hybrid_kv == "gather" else "ring_hybrid_halo"
            write_results(name, hybrid_rows, **extra)
        dist.destroy_process_group()
        return 0
    for layout in layouts:
        for causal in (False, True):
            for seq in seqs:
                if rank == 0:
                    print(f"world {world} layout {layout} causal {causal} seq {seq}", flush=True)
                new = run_case(
                    seq,
                    causal,
                    layout,
                    kv_heads=args.kv_heads,
                    rank=rank,
                    world=world,
                    check=not args.no_check,
                    warmup=args.warmup,
                    reps=args.reps,
                    rounds=args.rounds,
                )
                if args.profile:
                    _profile(
                        seq, causal, layout, kv_heads=args.kv_heads, rank=rank, world=world,
                        trace=args.trace,
                    )  # fmt: skip
                rows += new
                if rank == 0:
                    for r in new:
                        print(
                            f"  {r['method']:17s} fwd {r['fwd_tflops_per_gpu']:6.1f} "
                            f"bwd {r['bwd_tflops_per_gpu'] or 0:6.1f} TFLOP/s per GPU"
                            + (
                                f"  efficiency fwd {r['fwd_efficiency_vs_dense']:.2f}"
                                if "fwd_efficiency_vs_dense" in r
                                else ""
                            ),
                            flush=True,
                        )
                    write_results("ring", rows, partial=True, **extra)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
    if rank == 0:
        write_results("ring", rows, **extra, autotune=_autotune_choices())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
