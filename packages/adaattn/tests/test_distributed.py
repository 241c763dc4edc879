"""Ring attention (``adaattn.distributed``) against single-process float64 attention, over gloo.

Each multi-rank test forks 2 or 4 worker processes (fork: nothing is imported again, so a run
takes seconds) that join a gloo group on a free local port, and runs many cases in that one
group: causal and not, zig-zag and contiguous, grouped-query heads, float64, float32 and
bfloat16, the returned log-sum-exp and its gradient, sub-groups of 3 ranks and of 1, and the
errors. Under ``TRITON_INTERPRET=1`` the blocks also run the Triton kernels. Every rank draws
the same full tensors from a fresh seed (printed on failure), computes the reference on the full
sequence and checks its shard of the ring's output and of the gradients of ``q``, ``k``, ``v``.

The GPU test runs this file under torchrun with NCCL on 2 GPUs (see the end of the file).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from adaattn.distributed import LAYOUTS, ring_attention, shard_sequence, unshard_sequence
from adaattn_kernels import attention, attention_reference
from adaattn_kernels.fp8 import fp8_attention
from adaattn_kernels.hybrid import HybridPlan, hybrid_attention, hybrid_attention_reference

# float64 runs the same maths as the reference; lower precisions round each block's output once.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_coverage() -> Any:
    """Keep the lines a forked worker runs when the tests run under coverage (pytest-cov).

    A forked worker inherits the parent's tracer but exits through ``os._exit``, so its data
    would be lost: start a fresh collector writing a parallel data file that pytest-cov combines.
    """
    try:
        import coverage
    except ImportError:  # pragma: no cover
        return None
    parent = coverage.Coverage.current()
    if parent is None:
        return None
    parent.stop()
    cov = coverage.Coverage(
        data_file=os.path.abspath(parent.config.data_file),
        data_suffix=True,
        source=parent.config.source,
        branch=parent.config.branch,
        config_file=parent.config.config_file or True,
    )
    cov.start()
    return cov


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    cov = _child_coverage()
    torch.set_num_threads(1)  # 2–4 workers share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a broken ring fails instead of hanging
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
        if cov is not None:
            cov.stop()
            cov.save()


def _launch(world: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` forked gloo ranks; a worker's error fails."""
    mp.start_processes(
        _entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="fork"
    )


def _check_case(
    rank: int,
    world: int,
    *,
    seed: int,
    causal: bool,
    layout: str,
    heads: tuple[int, int],
    seq: int,
    dtype: torch.dtype,
    loss: str,
    scale: float | None = None,
    group: Any = None,
    head_dim: int = 16,
) -> None:
    """Ring vs reference output, lse and gradients of ``loss`` ("out", "lse" or "out+lse")."""
    case = f"causal={causal} layout={layout} heads={heads} seq={seq} {dtype} loss={loss}"
    gen = torch.Generator().manual_seed(seed)
    b, d = 1, head_dim
    with_out, with_lse = "out" in loss, "lse" in loss
    hq, hkv = heads
    q = torch.randn(b, hq, seq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, seq, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, seq, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, hq, seq, d, generator=gen, dtype=torch.float64)
    dlse = torch.randn(b, hq, seq, generator=gen, dtype=torch.float64)

    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_reference(*ref, causal=causal, scale=scale, return_lse=True)
    ((out_ref * dout * with_out).sum() + (lse_ref * dlse * with_lse).sum()).backward()

    grank, gworld = dist.get_rank(group), dist.get_world_size(group)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, grank, gworld, layout=layout)  # type: ignore[arg-type]

    def ring() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        local = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
        res = ring_attention(
            *local, causal=causal, scale=scale, layout=layout, return_lse=with_lse, group=group
        )
        out, lse = res if with_lse else (res, None)
        total = (out * shard(dout).to(dtype)).sum() if with_out else 0.0
        if lse is not None:
            total = total + (lse * shard(dlse).to(lse.dtype)).sum()
        assert isinstance(total, torch.Tensor)
        total.backward()
        return local, out.detach(), None if lse is None else lse.detach()

    # The first call of a signature runs its transfers unoverlapped, later ones overlap them
    # with compute (adaattn.distributed._WARM): the same maths, so the same bits.
    local, out, lse = ring()
    again = ring()
    for first, second in zip(
        [out, lse, *(t.grad for t in local)], [*again[1:], *(t.grad for t in again[0])]
    ):
        assert (first is None and second is None) or torch.equal(first, second), case

    rtol, atol = TOLERANCE[dtype]

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(
            got.double(),
            want,
            rtol=rtol,
            atol=atol,
            msg=lambda m: f"{what} differs ({case}, world {gworld}, seed {seed}):\n{m}",
        )

    assert out.dtype == dtype
    close(out, shard(out_ref.detach()), "output")
    if lse is not None:
        close(lse, shard(lse_ref.detach()), "lse")
    for name, t, r in zip("qkv", local, ref):
        assert t.grad is not None
        assert r.grad is not None
        close(t.grad, shard(r.grad), f"d{name}")
    full = unshard_sequence(out, layout=layout, group=group)  # type: ignore[arg-type]
    close(full, out_ref.detach(), "gathered output")


def _run_cases(rank: int, world: int, seed: int, cases: list[dict[str, Any]]) -> None:
    for i, case in enumerate(cases):
        _check_case(rank, world, seed=seed + i, **case)


def _world2(rank: int, world: int, seed: int) -> None:
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    cases: list[dict[str, Any]] = [
        {"causal": True, "layout": "zigzag", "heads": (2, 2), "dtype": f64, "loss": "out+lse"},
        {"causal": True, "layout": "contiguous", "heads": (2, 2), "dtype": f64, "loss": "out"},
        {"causal": False, "layout": "zigzag", "heads": (2, 2), "dtype": f64, "loss": "out"},
        {"causal": False, "layout": "contiguous", "heads": (4, 2), "dtype": f32, "loss": "out+lse"},
        {"causal": True, "layout": "zigzag", "heads": (4, 1), "dtype": f32, "loss": "out+lse"},
        {"causal": True, "layout": "contiguous", "heads": (4, 2), "dtype": f32, "loss": "out"},
        # 16-bit inputs accumulate in their own dtype over two ranks (one addition each).
        {"causal": True, "layout": "zigzag", "heads": (2, 2), "dtype": bf16, "loss": "out+lse"},
    ]
    for c in cases:
        c["seq"] = 32
    cases.append({**cases[0], "scale": 0.3, "seq": 36})
    cases.append({**cases[1], "loss": "lse"})  # the output unused: its gradient is None
    _run_cases(rank, world, seed, cases)
    _errors(rank, world)


def _errors(rank: int, world: int) -> None:
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="local length 8 but `k`/`v` have 4"):
        ring_attention(x, x[:, :, :4], x[:, :, :4])
    odd = torch.randn(1, 2, 7, 16)
    with pytest.raises(ValueError, match="odd"):
        ring_attention(odd, odd, odd)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(x, x, x, layout="striped")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="causal"):
        ring_attention(x, x, x, causal=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="comm_priority"):
        ring_attention(x, x, x, comm_priority="low")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="hybrid"):
        ring_attention(x, x, x, plan=object())  # type: ignore[arg-type]
    # Shards of different lengths on different ranks: every rank raises, nobody hangs.
    mine = torch.randn(1, 2, 8 + 4 * rank, 16)
    with pytest.raises(ValueError, match=r"different local length .*\{0: 8, 1: 12\}"):
        ring_attention(mine, mine, mine)
    with pytest.raises(ValueError, match="different causal"):
        ring_attention(x, x, x, causal=rank == 0)
    # Options that change which collectives run must agree too, or the ring would hang.
    with pytest.raises(ValueError, match="different path"), torch.no_grad():
        ring_attention(x, x, x, causal=True, precision="fp8" if rank == 0 else "exact")
    with pytest.raises(ValueError, match="different comm_priority"):
        ring_attention(x, x, x, comm_priority="high" if rank == 0 else "group")
    plan = HybridPlan.uniform(1, 2, seq_len_k=8 * world, window=4, rank=4)
    with pytest.raises(ValueError, match="different path"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=plan if rank == 0 else None)
    other = HybridPlan.uniform(1, 2, seq_len_k=8 * world, window=4 + 2 * rank, rank=4)
    with pytest.raises(ValueError, match="different fp8_options or plan"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=other)
    with pytest.raises(ValueError, match="zig-zag shard"):
        unshard_sequence(odd)
    # The group still works after the errors.
    assert ring_attention(x, x, x, causal=True).shape == x.shape


def _fp8_cases(rank: int, world: int, seed: int) -> None:
    """precision="fp8": each block through the FP8 op (CPU: its float8 simulation)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 96, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 96, 64, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 96, 64, generator=gen, dtype=torch.float64)
    for causal, layout, options, bound in [
        # int8 Q·Kᵀ + 16-bit P·V: ~1.3e-2 on N(0, 1) inputs; e4m3 P·V: ~3.8e-2 (docs/kernels/fp8.md)
        (True, "zigzag", {"pv_dtype": "fp16"}, 3e-2),
        (False, "contiguous", {}, 6e-2),
        (True, "zigzag", {"pv_dtype": "fp16", "outlier_channels": 16}, 3e-2),
    ]:
        out_ref, lse_ref = attention_reference(q, k, v, causal=causal, return_lse=True)

        def shard(t: torch.Tensor, layout: str = layout) -> torch.Tensor:
            return shard_sequence(t, rank, world, layout=layout)  # type: ignore[arg-type]

        local = [shard(t).to(torch.float16) for t in (q, k, v)]
        with torch.no_grad():
            out, lse = ring_attention(
                *local, causal=causal, layout=layout, return_lse=True,  # type: ignore[arg-type]
                precision="fp8", fp8_options=options,
            )  # fmt: skip
        want = shard(out_ref)
        err = float((out.double() - want).norm() / want.norm())
        assert err < bound, (causal, layout, options, err, seed)
        assert float((lse.double() - shard(lse_ref)).abs().max()) < 0.1
    x = torch.randn(1, 2, 8, 64, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        ring_attention(x, x, x, precision="fp8")
    with pytest.raises(ValueError, match="unknown keys"):
        ring_attention(x.detach(), x.detach(), x.detach(), precision="fp8", fp8_options={"x": 1})
    with pytest.raises(ValueError, match="outlier_channels"), torch.no_grad():
        ring_attention(x, x, x, precision="fp8", fp8_options={"outlier_channels": 8})


def test_ring_attention_fp8_blocks() -> None:
    _launch(2, _fp8_cases, random.SystemRandom().randrange(2**31))


def _hybrid_cases(rank: int, world: int, seed: int) -> None:
    """plan=...: causal hybrid heads (and exact ones) against the full-sequence reference."""
    gen = torch.Generator().manual_seed(seed)
    seq = 40 * world  # chunks of 20 (zig-zag) or 40 tokens: not multiples of the segments
    q = torch.randn(2, 4, seq, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, seq, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, seq, 16, generator=gen, dtype=torch.float64)
    # Per (batch, head): exact heads, windows shorter and longer than a chunk, 0–5 sinks and
    # segments of 1 to 8 keys (rank = seq / segment).
    plan = HybridPlan.build(
        2, 4, seq_len_k=seq,
        window=torch.tensor([[8, 24, 3, 50], [16, 8, 64, 5]]),
        rank=seq // torch.tensor([[4, 7, 1, 3], [5, 2, 6, 1]]),
        sinks=torch.tensor([[0, 5, 2, 0], [4, 0, 1, 3]]),
        exact=torch.tensor([[False, False, True, False], [False, True, False, False]]),
    )  # fmt: skip
    out_ref, lse_ref = hybrid_attention_reference(q, k, v, plan, causal=True, return_lse=True)
    for layout, dtype, tol in (
        ("zigzag", torch.float64, 1e-10),
        ("contiguous", torch.float32, 1e-5),
    ):
        local = [shard_sequence(t, rank, world, layout=layout).to(dtype) for t in (q, k, v)]  # type: ignore[arg-type]
        with torch.no_grad():
            out, lse = ring_attention(
                *local, causal=True, layout=layout, plan=plan, return_lse=True
            )  # type: ignore[arg-type]
        want = shard_sequence(out_ref, rank, world, layout=layout)  # type: ignore[arg-type]
        assert out.dtype == dtype
        torch.testing.assert_close(
            out.double(),
            want,
            rtol=tol,
            atol=tol,
            msg=lambda m, lay=layout: f"{lay}, seed {seed}: {m}",
        )
        torch.testing.assert_close(
            lse.double(),
            shard_sequence(lse_ref, rank, world, layout=layout),
            rtol=tol,
            atol=tol,  # type: ignore[arg-type]
        )
    _uniform_hybrid_cases(rank, world, q, k, v)
    x = torch.randn(2, 4, 8, 16)
    with pytest.raises(NotImplementedError, match="causal only"), torch.no_grad():
        ring_attention(x, x, x, plan=plan)
    with pytest.raises(ValueError, match="forward-only"):
        ring_attention(x.requires_grad_(), x, x, causal=True, plan=plan)
    with pytest.raises(ValueError, match="cannot be combined"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=plan, precision="fp8")
    with pytest.raises(ValueError, match="`plan` covers"), torch.no_grad():
        ring_attention(x[:1], x[:1], x[:1], causal=True, plan=plan)  # plan of shape (2, 4)
    with pytest.raises(TypeError, match="HybridPlan"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=object())  # type: ignore[arg-type]


def _overlap_flags(rank: int, world: int, seed: int) -> None:
    import adaattn.distributed as ring_module

    flags: list[tuple[int, bool]] = []
    exchange = ring_module._Ring.exchange

    def record(self: Any, send: tuple[torch.Tensor, ...], tag: int) -> Any:
        flags.append((tag, self.overlap))
        return exchange(self, send, tag)

    ring_module._Ring.exchange = record  # type: ignore[method-assign]  # this worker only
    torch.manual_seed(seed)
    # Local lengths 20, 20, 24 (one autotuning bucket, 32), then 40 (a new bucket, 64).
    for call, (length, warm) in enumerate([(20, False), (20, True), (24, True), (40, False)]):
        q, k, v = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(3))
        flags.clear()
        ring_attention(q, k, v, causal=True).sum().backward()
        kinds = {tag for tag, _ in flags}
        assert kinds == {ring_module._TAG_KV, ring_module._TAG_DKV}, flags
        # The first forward and backward of a bucket wait for every transfer at once.
        assert all(overlap == warm for _, overlap in flags), (call, flags)


def test_warm_buckets_are_the_kernels_autotuning_buckets() -> None:
    pytest.importorskip("triton")
    import adaattn.distributed as ring_module
    from adaattn_kernels.flash._triton_kernels import seq_bucket

    for n in [*range(1, 70), *range(100, 70000, 997), 16384, 16385, 2**20]:
        assert ring_module._tuning_bucket(n) == seq_bucket(n), n


def test_ring_attention_first_call_is_unoverlapped() -> None:
    _launch(2, _overlap_flags, random.SystemRandom().randrange(2**31))


def test_recent_keys_forget_the_least_recently_used() -> None:
    from adaattn.distributed import _RecentKeys

    keys = _RecentKeys(2)
    keys.add(("a",))
    keys.add(("b",))
    assert keys.seen(("a",))  # "a" is now the most recent: "b" goes first
    keys.add(("c",))
    assert len(keys) == 2
    assert not keys.seen(("b",))
    assert keys.seen(("a",))
    assert keys.seen(("c",))


def _forgotten_signatures(rank: int, world: int, seed: int) -> None:
    import adaattn.distributed as ring_module

    ring_module._CHECKED_CAPACITY = 1  # this worker only: every new signature evicts the last
    gathers = 0
    all_gather = ring_module.dist.all_gather

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal gathers
        gathers += 1
        return all_gather(*args, **kwargs)

    ring_module.dist.all_gather = counting  # the signature check's only collective here
    torch.manual_seed(seed)
    full = {
        n: [torch.randn(1, 2, n * world, 8, dtype=torch.float64) for _ in range(3)] for n in (6, 10)
    }
    for call, n in enumerate([6, 6, 10, 6, 10]):
        q, k, v = (shard_sequence(t, rank, world, layout="zigzag") for t in full[n])
        before = gathers
        with torch.no_grad():
            out = ring_attention(q, k, v, causal=True, layout="zigzag")
        # Checked on first sight and again once forgotten (call 3: 6 was evicted by 10).
        assert gathers - before == (0 if call == 1 else 1), (call, gathers - before)
        want = attention_reference(*full[n], causal=True)
        torch.testing.assert_close(out, shard_sequence(want, rank, world, layout="zigzag"))


def test_forgotten_signatures_are_checked_again_on_every_rank() -> None:
    _launch(2, _forgotten_signatures, random.SystemRandom().randrange(2**31))


def _groups_forget_on_their_own(rank: int, world: int, seed: int) -> None:
    """Groups X = {0, 1} and Y = {1, 2}: rank 1's calls on Y must not make it forget X's."""
    import adaattn.distributed as ring_module

    ring_module._CHECKED_CAPACITY = 1  # this worker only
    timeout = datetime.timedelta(seconds=30)  # a regression fails instead of hanging
    group_x = dist.new_group([0, 1], timeout=timeout)
    group_y = dist.new_group([1, 2], timeout=timeout)
    torch.manual_seed(seed)
    full = [torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3)]
    want = attention_reference(*full, causal=True)
    calls = {0: ["x", "x"], 1: ["x", "y", "x"], 2: ["y"]}[rank]
    for name in calls:
        group, members = (group_x, [0, 1]) if name == "x" else (group_y, [1, 2])
        me = members.index(rank)
        q, k, v = (shard_sequence(t, me, 2) for t in full)
        with torch.no_grad():
            out = ring_attention(q, k, v, causal=True, group=group)
        torch.testing.assert_close(out, shard_sequence(want, me, 2))


def test_each_group_forgets_signatures_on_its_own() -> None:
    _launch(3, _groups_forget_on_their_own, random.SystemRandom().randrange(2**31))


def _uniform_hybrid_cases(
    rank: int, world: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``hybrid_kv="halo"`` (no gathered sequence): the same result as the reference."""
    import adaattn.distributed as ring_module

    gathered = ring_module._hybrid_ring_forward

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("hybrid_kv='halo' gathered the whole sequence")

    ring_module._hybrid_ring_forward = refuse  # this worker only
    seq = q.shape[2]
    # (window, sinks, segment): windows inside one chunk and across several, sinks that round
    # up to a segment, segments that do not divide the chunks, segment 1 (pooled = the keys).
    for w, s, g in [(8, 0, 3), (5, 4, 4), (30, 2, 7), (1, 0, 1), (12, 9, 5), (3, 3, 2)]:
        plan = HybridPlan(
            *(torch.full((2, 4), x, dtype=torch.int32) for x in (w, s, g))  # type: ignore[arg-type]
        )
        out_ref, lse_ref = hybrid_attention_reference(q, k, v, plan, causal=True, return_lse=True)
        for layout in LAYOUTS:
            local = [shard_sequence(t, rank, world, layout=layout) for t in (q, k, v)]  # type: ignore[arg-type]
            with torch.no_grad():
                out, lse = ring_attention(
                    *local, causal=True, layout=layout, plan=plan, return_lse=True,  # type: ignore[arg-type]
                    hybrid_kv="halo",
                )  # fmt: skip
            case = f"w={w} s={s} g={g} {layout} seq={seq}"
            want = shard_sequence(out_ref, rank, world, layout=layout)  # type: ignore[arg-type]
            torch.testing.assert_close(
                out, want, rtol=1e-10, atol=1e-10, msg=lambda m, c=case: f"{c}: {m}"
            )
            torch.testing.assert_close(
                lse, shard_sequence(lse_ref, rank, world, layout=layout),  # type: ignore[arg-type]
                rtol=1e-10, atol=1e-10, msg=lambda m, c=case: f"{c}: {m}",
            )  # fmt: skip
    ring_module._hybrid_ring_forward = gathered
    x = torch.randn(2, 4, 8, 16)
    mixed = HybridPlan.build(2, 4, seq_len_k=8 * world, window=4, rank=4, exact=True)
    with pytest.raises(ValueError, match="needs a uniform plan"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=mixed, hybrid_kv="halo")
    with pytest.raises(ValueError, match="only applies with a hybrid"):
        ring_attention(x, x, x, hybrid_kv="halo")
    with pytest.raises(ValueError, match="`hybrid_kv` must be"):
        ring_attention(x, x, x, hybrid_kv="ring")  # type: ignore[arg-type]
    uniform = HybridPlan(*(torch.full((2, 4), 2, dtype=torch.int32) for _ in range(3)))
    kv = "halo" if rank == 0 else "gather"
    with pytest.raises(ValueError, match="different path"), torch.no_grad():
        ring_attention(x, x, x, causal=True, plan=uniform, hybrid_kv=kv)  # type: ignore[arg-type]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_hybrid_plans(world: int) -> None:
    _launch(world, _hybrid_cases, random.SystemRandom().randrange(2**31))


def _world4(rank: int, world: int, seed: int) -> None:
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    cases: list[dict[str, Any]] = [
        {"causal": True, "layout": "zigzag", "heads": (4, 2), "dtype": f64, "loss": "out+lse"},
        {"causal": True, "layout": "contiguous", "heads": (2, 2), "dtype": f32, "loss": "out"},
        {"causal": False, "layout": "zigzag", "heads": (2, 1), "dtype": f64, "loss": "out"},
        # 16-bit inputs over four ranks: the partial results accumulate in float32.
        {"causal": True, "layout": "zigzag", "heads": (2, 2), "dtype": bf16, "loss": "out+lse"},
    ]
    _run_cases(rank, world, seed, [{**c, "seq": 64} for c in cases])
    # Sub-groups: ranks 1, 2, 3 (group ranks 0, 1, 2 differ from the global ones), and rank 0
    # alone (a ring of one). Every rank creates every group, in the same order.
    sub = dist.new_group([1, 2, 3])
    solo = dist.new_group([0])
    if rank == 0:
        x = torch.randn(1, 2, 8, 16)
        with pytest.raises(ValueError, match="not a member"):
            ring_attention(x, x, x, group=sub)
        solo_cases: list[dict[str, Any]] = [
            {"causal": True, "layout": "zigzag", "heads": (2, 1), "dtype": f64, "loss": "out+lse"},
            {"causal": True, "layout": "zigzag", "heads": (2, 2), "dtype": bf16, "loss": "out"},
        ]
        _run_cases(rank, world, seed + 200, [{**c, "seq": 16, "group": solo} for c in solo_cases])
        return
    sub_cases: list[dict[str, Any]] = [
        {"causal": True, "layout": "zigzag", "heads": (2, 2), "dtype": f64, "loss": "out+lse"},
        {"causal": True, "layout": "contiguous", "heads": (4, 2), "dtype": f32, "loss": "out"},
    ]
    _run_cases(rank, world, seed + 100, [{**c, "seq": 48, "group": sub} for c in sub_cases])


@pytest.mark.parametrize(("world", "fn"), [(2, _world2), (4, _world4)], ids=["world2", "world4"])
def test_ring_attention_matches_single_process(world: int, fn: Callable[..., None]) -> None:
    _launch(world, fn, random.SystemRandom().randrange(2**31))


def _triton_path(rank: int, world: int, seed: int) -> None:
    import adaattn.distributed as ring_module

    # In this forked worker only: CPU blocks run the Triton kernels through the interpreter.
    ring_module._runs_triton = lambda q, k, v: True
    f16 = torch.float16
    cases: list[dict[str, Any]] = [
        {"causal": True, "layout": "zigzag", "heads": (4, 2), "dtype": f16, "loss": "out+lse"},
        {"causal": False, "layout": "contiguous", "heads": (2, 2), "dtype": f16, "loss": "out"},
    ]
    _run_cases(rank, world, seed, [{**c, "seq": 128, "head_dim": 32} for c in cases])


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="needs triton and TRITON_INTERPRET=1 set before triton is imported (nox -s tests-cpu "
    "sets it)",
)
def test_ring_attention_triton_kernels_interpreted() -> None:
    """The blocks' Triton forward and ``adaattn::flash_attention_backward`` with the global lse."""
    _launch(2, _triton_path, random.SystemRandom().randrange(2**31))


def test_not_initialised() -> None:
    if dist.is_initialized():  # pragma: no cover - the test process never joins a group
        pytest.skip("this process is in a process group")
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(x, x, x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        unshard_sequence(x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_sequence_partitions_the_sequence(layout: str) -> None:
    world, seq = 3, 12
    x = torch.arange(seq).view(1, 1, seq, 1).expand(2, 3, seq, 4)
    shards = [shard_sequence(x, r, world, layout=layout) for r in range(world)]  # type: ignore[arg-type]
    positions = [s[0, 0, :, 0].tolist() for s in shards]
    assert sorted(p for ps in positions for p in ps) == list(range(seq))
    if layout == "zigzag":  # chunks r and 2·world − 1 − r: equal causal work per rank
        assert positions == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    else:
        assert positions == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    from adaattn.distributed import _merge_shards

    assert torch.equal(_merge_shards(shards, layout, 2), x)
    # Another sequence dimension, counted from the end.
    y = torch.arange(24).view(1, 24, 1)
    assert shard_sequence(y, 0, 2, layout=layout, dim=-2).shape == (1, 12, 1)  # type: ignore[arg-type]


def test_shard_sequence_errors() -> None:
    x = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match=r"multiple of 8 \(2·world"):
        shard_sequence(x, 0, 4)
    with pytest.raises(ValueError, match="multiple of 5"):
        shard_sequence(x, 0, 5, layout="contiguous")
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 2\)"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="`world` must be"):
        shard_sequence(x, 0, 0)
    with pytest.raises(TypeError, match="`rank` must be an int"):
        shard_sequence(x, 0.0, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor"):
        shard_sequence(x.tolist(), 0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dim` 4 is out of range"):
        shard_sequence(x, 0, 2, dim=4)
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(x, 0, 2, layout="striped")  # type: ignore[arg-type]


# --- GPU: NCCL over 2 CUDA devices, run as `torchrun --nproc-per-node 2 <this file>` ----------


@pytest.mark.gpu
def test_ring_attention_nccl_matches_single_gpu() -> None:
    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("needs ≥ 2 CUDA devices and NCCL")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*cmd, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("ring attention ok") == 2, proc.stdout[-4000:]
    print(proc.stdout)  # the FP8 errors, for the log (pytest -rA)


def _gpu_main() -> None:  # pragma: no cover - needs 2 GPUs
    """One torchrun rank: bf16 ring attention vs the single-GPU kernel, both vs float32."""
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda")

    def run(fn: Callable[..., torch.Tensor], grad: torch.Tensor, *ts: torch.Tensor) -> list[Any]:
        leaves = [t.detach().requires_grad_() for t in ts]
        out = fn(*leaves)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves)]

    for causal in (True, False):
        for layout in LAYOUTS:
            gen = torch.Generator(device=dev).manual_seed(1234)
            shapes = ((1, 8, 4096, 128), (1, 2, 4096, 128), (1, 2, 4096, 128), (1, 8, 4096, 128))
            q, k, v, dout = (torch.randn(s, generator=gen, device=dev) for s in shapes)
            shard = partial(shard_sequence, rank=rank, world=world, layout=layout)
            want = run(partial(attention_reference, causal=causal), dout, q, k, v)
            bf = [t.bfloat16() for t in (q, k, v, dout)]
            single = run(partial(attention, causal=causal), bf[3], *bf[:3])
            # The transfers on the high-priority twin group (default) and on the group's own.
            priority = "high" if layout == "zigzag" else "group"
            ring_fn = partial(ring_attention, causal=causal, layout=layout, comm_priority=priority)
            # The first call runs its transfers unoverlapped (autotuning), the second overlaps.
            for call in ("first", "second"):
                ring = run(ring_fn, *(shard(t) for t in (bf[3], *bf[:3])))
                for name, r, s, w in zip(("out", "dq", "dk", "dv"), ring, single, want):
                    ref = shard(w)
                    err_ring = float((r.float() - ref).norm() / ref.norm())
                    err_single = float((shard(s).float() - ref).norm() / ref.norm())
                    assert err_ring <= 2 * err_single + 2e-3, (
                        f"{name} causal={causal} {layout} ({call} call): ring error "
                        f"{err_ring:.2e}, single-GPU error {err_single:.2e}"
                    )
            if layout == "zigzag":  # FP8 blocks (forward only) vs the FP8 op on one GPU
                with torch.no_grad():
                    fp8_ring = ring_attention(
                        *(shard(t) for t in bf[:3]), causal=causal, precision="fp8"
                    )
                    fp8_single = fp8_attention(*bf[:3], causal=causal)
                ref = shard(want[0])
                err_ring = float((fp8_ring.float() - ref).norm() / ref.norm())
                err_single = float((shard(fp8_single).float() - ref).norm() / ref.norm())
                assert err_ring <= 1.5 * err_single + 5e-3, (
                    f"fp8 causal={causal}: ring error {err_ring:.2e}, one-GPU {err_single:.2e}"
                )
                if rank == 0:
                    print(f"fp8 causal={causal}: error {err_ring:.2e} (one GPU {err_single:.2e})")
            # Hybrid heads vs one GPU: half of them (gathered K/V), then all (halo exchange).
            for label, exact in (
                ("half", torch.arange(8, device=dev)[None] % 2 == 0),
                ("all", False),
            ):
                if not causal:
                    break
                plan = HybridPlan.build(
                    1, 8, seq_len_k=q.shape[2], window=512, rank=64, sinks=4, exact=exact,
                    device=dev,
                )  # fmt: skip
                want_h = hybrid_attention_reference(q, k, v, plan, causal=True)
                with torch.no_grad():
                    h_ring = ring_attention(
                        *(shard(t) for t in bf[:3]), causal=True, layout=layout, plan=plan,
                        hybrid_kv="gather" if label == "half" else "halo",
                    )  # fmt: skip
                    h_single = hybrid_attention(*bf[:3], plan, causal=True)
                ref = shard(want_h)
                err_ring = float((h_ring.float() - ref).norm() / ref.norm())
                err_single = float((shard(h_single).float() - ref).norm() / ref.norm())
                assert err_ring <= 2 * err_single + 2e-3, (
                    f"hybrid ({label} heads, {layout}): ring error {err_ring:.2e}, one-GPU "
                    f"{err_single:.2e}"
                )
                if rank == 0:
                    print(
                        f"hybrid ({label} heads, {layout}): error {err_ring:.2e} "
                        f"(one GPU {err_single:.2e})"
                    )
    print(f"rank {rank}: ring attention ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _gpu_main()
