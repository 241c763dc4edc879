"""Ring attention: one long sequence split over processes, exact attention and its gradients.

Run with torchrun — NCCL when CUDA is available (one GPU per process), gloo on CPU:

    torchrun --nproc-per-node 2 examples/ring_attention.py
    torchrun --nproc-per-node 4 examples/ring_attention.py --seq-len 16384 --no-causal
    torchrun --nproc-per-node 2 examples/ring_attention.py --cpu     # gloo, even with GPUs

Run as a plain script it starts 2 local CPU processes itself (what the docs tests do):

    python examples/ring_attention.py

Every rank draws the same full q, k, v (one seed; in a model each rank would compute only its
own tokens), keeps its zig-zag shard (``adaattn.distributed.shard_sequence``), runs causal
``ring_attention`` forward and backward, and compares its shard of the output and of the
gradients of q, k, v with single-device attention (``adaattn_kernels.attention``) on the whole
sequence. ``unshard_sequence`` gathers the full output on every rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import adaattn_kernels
import torch
import torch.distributed as dist
from adaattn.distributed import ring_attention, shard_sequence, unshard_sequence


def run(args: argparse.Namespace) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")  # reads torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32

    # The whole sequence, identical on every rank (same seed): 8 query heads over 2 key/value
    # heads (grouped-query attention).
    gen = torch.Generator(device=device).manual_seed(args.seed)
    s, d = args.seq_len, args.head_dim
    q = torch.randn(1, 8, s, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, 2, s, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(1, 2, s, d, generator=gen, device=device, dtype=dtype)
    dout = torch.randn(1, 8, s, d, generator=gen, device=device, dtype=dtype)

    # This rank's tokens: chunks `rank` and `2·world − 1 − rank` of 2·world (zig-zag).
    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, rank, world, layout=args.layout)

    q_l, k_l, v_l = (shard(t).detach().requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    out_l = ring_attention(q_l, k_l, v_l, causal=args.causal, layout=args.layout)
    out_l.backward(shard(dout))
    if use_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    # Single-device attention on the whole sequence, for comparison.
    full = [t.detach().requires_grad_() for t in (q, k, v)]
    out = adaattn_kernels.attention(*full, causal=args.causal)
    assert isinstance(out, torch.Tensor)
    out.backward(dout)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    errors = {
        "out": rel(out_l, shard(out)),
        "dq": rel(q_l.grad, shard(full[0].grad)),
        "dk": rel(k_l.grad, shard(full[1].grad)),
        "dv": rel(v_l.grad, shard(full[2].grad)),
        "gathered out": rel(unshard_sequence(out_l, layout=args.layout), out),
    }
    worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if rank == 0:
        print(
            f"ring attention over {world} ranks ({'NCCL' if use_cuda else 'gloo'}, {dtype}): "
            f"seq {s} ({s // world} per rank, layout {args.layout}), causal={args.causal}, "
            f"forward+backward {seconds * 1e3:.1f} ms on rank 0"
        )
        for (name, _), err in zip(errors.items(), worst.tolist()):
            print(f"  {name:13s} relative error vs single-device attention: {err:.2e}")
    dist.destroy_process_group()
    if max(worst.tolist()) > tolerance:
        raise SystemExit(f"rank {rank}: ring attention differs from single-device attention")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even if CUDA is present")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        run(args)
        return
    # A plain `python examples/ring_attention.py`: 2 local CPU ranks over gloo.
    args.cpu = True
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(
        _spawned, args=(2, port, args), nprocs=2, start_method="spawn"
    )


if __name__ == "__main__":
    main()
