"""Benchmark context-parallel ring attention on N GPUs against the dense single-GPU kernel.

Run from the repository root on a machine with N ≥ 2 GPUs (one process per GPU, NCCL)::

    torchrun --nproc-per-node 2 -m tools.bench.bench_ring             # seq 32k, 64k, 128k
    torchrun --nproc-per-node 2 -m tools.bench.bench_ring --quick     # seq 32k only
    torchrun --nproc-per-node 8 -m tools.bench.bench_ring --seqs 131072 262144

Grid: total sequence ``S`` (default 32k–128k tokens), bf16, head_dim 128, batch 1, 16 query
heads over ``--kv-heads`` key/value heads (default 16; fewer for GQA), causal and not, layout
zig-zag (``--layouts zigzag contiguous`` adds the unbalanced split). Each rank holds ``S/N``
tokens of q, k, v.

Throughput per GPU counts the whole problem's FLOPs — ``4·B·H·S²·D`` for the forward, halved
when causal, and 2.5× that for the backward, as in ``bench_flash`` — divided by ``N`` and by
the slowest rank's median time (CUDA events, the ranks started together after a barrier). The
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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tools.bench.common import rel_error, write_results

if TYPE_CHECKING:
    from adaattn.distributed import Layout

HEADS = 16
HEAD_DIM = 128
DEVICE = torch.device("cuda")  # --cpu: a gloo smoke run of the script on CPU


def _time_ms(fn: Callable[[], Any], *, warmup: int, reps: int) -> float:
    """Mean ms of one call over ``reps`` calls, ranks started together; the slowest rank's."""
    for _ in range(warmup):
        fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    if DEVICE.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        elapsed = start.elapsed_time(end)
    else:  # --cpu smoke run
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = (time.perf_counter() - t0) * 1e3
    ms = torch.tensor([elapsed / reps], device=DEVICE)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.item())


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
    out_l = ring_attention(*local, causal=causal, layout=layout)
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
    fwd, bwd = _fwd_bwd_ms(
        lambda *t: ring_attention(*t, causal=causal, layout=layout),
        *local,
        warmup=warmup,
        reps=reps,
    )
    rows.append(ring_row)

    # The dense kernel on each GPU alone, the same work: full sequence, H/N query heads.
    dense_row: dict[str, Any] = {"method": "dense_single_gpu", **base}
    hq, hkv = HEADS // world, max(1, kv_heads // world)
    dense_row.update({"heads": hq, "kv_heads": hkv})
    dfwd, dbwd = _fwd_bwd_ms(
        lambda *t: adaattn_kernels.attention(*t, causal=causal),
        q[:, :hq].contiguous(),
        k[:, :hkv].contiguous(),
        v[:, :hkv].contiguous(),
        warmup=warmup,
        reps=reps,
    )
    rows.append(dense_row)

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 32k only")
    ap.add_argument("--seqs", type=int, nargs="*", help="total sequence lengths")
    ap.add_argument("--kv-heads", type=int, default=HEADS, help="key/value heads (GQA if < 16)")
    ap.add_argument("--layouts", nargs="*", default=["zigzag"], choices=["zigzag", "contiguous"])
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
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
    global DEVICE
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
    extra = {"world": world, "kv_heads": args.kv_heads, "smoke_cpu": args.cpu}
    layouts: list[Layout] = args.layouts
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
                )
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
        write_results("ring", rows, **extra)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
