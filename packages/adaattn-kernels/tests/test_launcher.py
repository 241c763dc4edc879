"""Replay of compiled Triton kernels (``adaattn_kernels._triton.KernelLauncher``).

The CPU tests check the replay key: it must separate every call Triton would compile or tune
differently (integer values, dtypes, 16-byte alignment, descriptors, constexprs) and ignore
floats, which Triton does not specialise on. The GPU tests check that repeat calls are replayed
and give bit-for-bit the output of Triton's own launch path, for every kernel family.
"""

from __future__ import annotations

import pytest
import torch
from adaattn_kernels import attention
from adaattn_kernels._triton import KernelLauncher, set_replay


def _key(*args, **kwargs):
    return KernelLauncher._key(args, kwargs)


def test_key_separates_what_triton_specialises_on():
    x = torch.randn(64, 8)
    base = _key(x, 7, 0.5, None, HEAD_DIM=64)
    assert base == _key(torch.randn(64, 8), 7, 0.5, None, HEAD_DIM=64)  # new data, same key
    assert base != _key(x, 7, 0.25, None, HEAD_DIM=64)  # float value (a constexpr float is baked)
    assert base != _key(x, 8, 0.5, None, HEAD_DIM=64)  # integer value
    assert base != _key(x.half(), 7, 0.5, None, HEAD_DIM=64)  # dtype
    assert base != _key(x, 7, 0.5, None, HEAD_DIM=128)  # constexpr
    assert base != _key(x, 7, 0.5, None, HEAD_DIM=64.0)  # constexpr type
    assert base != _key(x, 7, 0.5, x, HEAD_DIM=64)  # None vs tensor
    assert base != _key(x, 7, 1, None, HEAD_DIM=64)  # an int where a float was: Triton
    # specialises integers equal to 1 as constants.


def test_key_separates_alignment():
    flat = torch.randn(1024)
    aligned, shifted = flat[:512], flat[1:513]  # 4-byte offset: not 16-byte aligned
    assert aligned.data_ptr() % 16 == 0
    assert shifted.data_ptr() % 16 != 0
    assert _key(aligned) != _key(shifted)


def test_key_of_descriptors_and_unknown_objects():
    from triton.tools.tensor_descriptor import TensorDescriptor

    k = torch.randn(256, 64)
    d1 = TensorDescriptor.from_tensor(k, [64, 64])
    d2 = TensorDescriptor.from_tensor(torch.randn(256, 64), [64, 64])
    d3 = TensorDescriptor.from_tensor(k, [32, 64])
    assert _key(d1) == _key(d2)
    assert _key(d1) != _key(d3)
    assert _key(object()) is None  # unknown argument kinds go through Triton every time


gpu = pytest.mark.gpu


def _qkv(b, hq, hkv, s, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g)
    return mk(hq), mk(hkv), mk(hkv)


def _replay_on_new_data(run, make):
    """``run(*make(1))`` through Triton's own launch path, and replayed after a recording call
    on other data (``make(0)``), whose output stays alive so the replay cannot reuse its memory.

    Returns ``(plain, replayed)``; restores every launcher's previous replay setting.
    """
    from adaattn_kernels._triton import _LAUNCHERS

    before = [launcher.enabled for launcher in _LAUNCHERS]
    first, second = make(0), make(1)
    try:
        set_replay(False)
        plain = run(*second)
        set_replay(True)
        kept = run(*first)  # records (or replays, if an earlier test recorded this key)
        replayed = run(*second)
    finally:
        for launcher, enabled in zip(_LAUNCHERS, before, strict=True):
            launcher.enabled = enabled
    assert kept is not None
    return plain, replayed


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dense_forward_and_backward_replay_bit_for_bit(causal):
    from adaattn_kernels.flash import _triton_kernels as fk

    make = lambda seed: _qkv(2, 8, 2, 1000, 64, seed=seed)
    before = fk.launch_fwd.replays
    plain, replayed = _replay_on_new_data(
        lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"), make
    )
    assert fk.launch_fwd.replays > before
    assert _same(plain, replayed)

    def grads(q, k, v):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        attention(qq, kk, vv, causal=causal, backend="triton").float().square().sum().backward()
        return qq.grad, kk.grad, vv.grad

    before = fk.launch_bwd_dq.replays
    plain, replayed = _replay_on_new_data(grads, make)
    assert fk.launch_bwd_dq.replays > before
    assert _same(plain, replayed)


@gpu
def test_hybrid_mixed_plan_replays_every_launch():
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention
    from adaattn_kernels.hybrid import _kernels as hk

    plan = HybridPlan.build(
        1, 8, seq_len_k=2048, window=256, rank=32, sinks=4,
        exact=(torch.arange(8) % 2 == 0)[None, :], device="cuda",
    )  # fmt: skip
    counts = (hk.launch_pool.replays, hk.launch_fwd.replays)
    plain, replayed = _replay_on_new_data(
        lambda q, k, v: hybrid_attention(
            q, k, v, plan, causal=True, return_lse=True, backend="triton"
        ),
        lambda seed: _qkv(1, 8, 8, 2048, 64, seed=seed),
    )
    assert hk.launch_pool.replays > counts[0]
    assert hk.launch_fwd.replays > counts[1]
    assert _same(plain, replayed)


@gpu
def test_fp8_forward_replays_with_descriptors():
    from adaattn_kernels.fp8 import _triton_kernels as f8
    from adaattn_kernels.fp8 import fp8_attention

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 attention needs compute capability 9.0 (Hopper) or newer")
    before = f8.launch_fwd.replays
    plain, replayed = _replay_on_new_data(
        lambda q, k, v: fp8_attention(q, k, v, causal=True),
        lambda seed: _qkv(1, 8, 2, 2048, 128, seed=seed),
    )
    assert f8.launch_fwd.replays > before
    assert _same(plain, replayed)


@gpu
def test_replay_on_another_stream_and_inside_a_cuda_graph():
    """Replays launch on the caller's current stream, so they follow it and graphs capture them."""
    q, k, v = _qkv(1, 4, 4, 1024, 64, seed=7)
    run = lambda: attention(q, k, v, causal=True, backend="triton")
    eager = run()  # records (or replays)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.copy_(torch.randn_like(q))  # new data in the same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, run())


@gpu
def test_unaligned_and_interleaved_shapes_stay_correct():
    """A misaligned view and alternating shapes (sequence buckets 512, 4096 and 8192, so the
    autotuner may pick a different tile for each) never reuse another key's binary or grid."""
    from adaattn_kernels import attention_reference

    q, k, v = _qkv(1, 4, 4, 512, 64, seed=3)
    flat = torch.randn(q.numel() + 8, device="cuda", dtype=q.dtype)
    q_shift = flat[1 : 1 + q.numel()].view_as(q).copy_(q)  # same values, 2-byte offset
    assert q_shift.data_ptr() % 16 != 0
    cases = [(q, k, v), (q_shift, k, v), _qkv(2, 4, 4, 300, 64, seed=4)]
    cases += [_qkv(1, 2, 2, 3000, 64, seed=5), _qkv(1, 2, 1, 5000, 128, seed=6)]
    refs = [attention_reference(*(t.double() for t in c), causal=True) for c in cases]
    for _ in range(3):
        for (qq, kk, vv), ref in zip(cases, refs, strict=True):
            out = attention(qq, kk, vv, causal=True, backend="triton")
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < 1e-2, err  # bf16 output rounding ~2e-3


@gpu
def test_grid_follows_values_outside_the_key():
    """Plans with the same shapes but different exact-head counts launch the same binaries
    with different grids (head-list length, hybrid head count): each call must use its own."""
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention, hybrid_attention_reference

    q, k, v = _qkv(1, 8, 8, 1024, 64, seed=5)
    build = lambda n: HybridPlan.build(
        1, 8, seq_len_k=1024, window=128, rank=16, sinks=4,
        exact=(torch.arange(8) < n)[None, :], device="cuda",
    )  # fmt: skip
    plans = [build(n) for n in (1, 4, 6, 3)]
    refs = [
        hybrid_attention_reference(q.double(), k.double(), v.double(), p, causal=True)
        for p in plans
    ]
    for _ in range(3):
        for plan, ref in zip(plans, refs, strict=True):
            out = hybrid_attention(q, k, v, plan, causal=True, backend="triton")
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < 1e-2, err


def test_launch_hooks_send_every_launch_through_triton():
    """A profiler's launch hook must see every launch, so replay stands aside while one is set."""
    from adaattn_kernels._triton import _launch_hooked
    from triton import knobs

    assert not _launch_hooked(knobs)
    hook = lambda metadata: None
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert _launch_hooked(knobs)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not _launch_hooked(knobs)
