"""GPU tests of the 8-bit attention kernels (quantisation, accuracy vs float64, compile, opcheck).

Cheap by design (well under a minute after compilation on an H100): one or two heads per
long-sequence case, float64 references computed in query chunks.
"""

from __future__ import annotations

import pytest
import torch
from adaattn_kernels import attention_reference
from adaattn_kernels.fp8 import (
    fp8_attention,
    fp8_attention_reference,
    quantize_fp8_triton,
    quantize_int8,
    quantize_int8_triton,
)
from adaattn_kernels.fp8.quant import quantize_channels_t
from adaattn_precision import detect, quantize_fp8

pytestmark = pytest.mark.gpu


def _need_fp8() -> None:
    if not detect("cuda").fp8_e4m3:
        pytest.skip("this GPU has no FP8 e4m3 tensor cores (sm_89+ needed)")


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _cos(x, ref):
    x, ref = x.double().flatten(), ref.double().flatten()
    return float(x @ ref / (x.norm() * ref.norm()))


def _inputs(b, hq, hkv, sq, sk, d, *, kind="normal", seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g)
    q, k, v = mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)
    if kind == "outlier":
        # Heavy-tailed: K with a large per-channel offset, Q with four 20× channels.
        k = k + 8.0 * mk(1, 1, 1, d)
        q[..., torch.randperm(d, device="cuda", generator=g)[:4]] *= 20.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sage_error(q, k, v, causal, rows, exact) -> str:
    """SageAttention's error on the same inputs (fp16), for the log, or "not installed"."""
    try:
        from sageattention import sageattn
    except ImportError:
        return "not installed"
    with torch.no_grad():
        out = sageattn(q.half(), k.half(), v.half(), tensor_layout="HND", is_causal=causal)
    return f"rel {_rel(out[:, :, rows], exact):.4f}"


def _assert_same(got, ref, what):
    """Bit equality, with the number and first example of differing entries on failure."""
    g, r = got.view(torch.uint8) if got.element_size() == 1 else got, ref
    r = r.view(torch.uint8) if ref.element_size() == 1 else r
    diff = (g != r).nonzero()
    if len(diff):
        i = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {len(diff)} of {g.numel()} entries differ; first at {i}: got "
            f"{got[i].float().item()!r} expected {ref[i].float().item()!r}"
        )


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_quantisation_bit_exact_on_gpu(granularity):
    _need_fp8()
    q, k, v = _inputs(2, 4, 4, 1000, 1000, 128, kind="outlier")
    for name, x in (("q", q), ("k", k)):
        ref_q, ref_s = quantize_fp8(x, granularity=granularity)
        got_q, got_s = quantize_fp8_triton(x, granularity=granularity)
        _assert_same(got_s, ref_s, f"e4m3 scales of {name}")
        _assert_same(got_q, ref_q, f"e4m3 values of {name}")
    ref_t, ref_ts = quantize_fp8(v.transpose(-1, -2), granularity="token")
    got_t, got_ts = quantize_channels_t(v, pad_to=128)
    _assert_same(got_ts, ref_ts, "e4m3 channel scales of v")
    _assert_same(got_t[..., :1000], ref_t, "e4m3 values of vᵀ")
    for name, x in (("q", q), ("k", k)):  # int8: the GPU's division and rounding, bit-exact too
        ref_i, ref_is = quantize_int8(x, granularity=granularity)
        got_i, got_is = quantize_int8_triton(x, granularity=granularity)
        _assert_same(got_is, ref_is, f"int8 scales of {name}")
        _assert_same(got_i, ref_i, f"int8 values of {name}")


# Kernel vs its simulation. Same quantisation; the differences are Hopper's reduced-precision
# FP8 accumulator inside one tile (~14 bits; the int8 Q·Kᵀ accumulates exactly in int32), which
# can move a rare probability across an e4m3 boundary, and bf16 output rounding (2^-9). 1e-2 is
# 4× below the FP8 error itself; for int8 Q·Kᵀ with 16-bit P·V (error 1.3e-2) it is still
# 100× below what a quantisation or indexing bug gives.
SIM_TOL = 1e-2


@pytest.mark.parametrize("qk_dtype", ["int8", "fp8"])
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "opts"),
    [
        (2, 4, 4, 1024, 1024, 128, {}),
        (2, 8, 2, 1000, 1500, 64, {"causal": True}),
        (1, 4, 1, 1500, 1000, 128, {"causal": True, "pv_dtype": "fp16"}),
        (1, 4, 2, 777, 777, 64, {"causal": "top_left", "granularity": "token"}),
        (1, 2, 2, 513, 2049, 128, {"block_size": 64, "pv_dtype": "fp16"}),
        (1, 4, 2, 1000, 1200, 128, {"granularity": "q_token", "causal": True}),
        (2, 8, 2, 1000, 1500, 128, {"causal": True, "outlier_channels": 16}),
        (1, 4, 1, 777, 1024, 64, {"pv_dtype": "fp16", "outlier_channels": 32}),
        (1, 2, 2, 513, 2049, 128, {"block_size": 64, "outlier_channels": 16}),
    ],
)
def test_kernel_matches_simulation(b, hq, hkv, sq, sk, d, opts, qk_dtype):
    _need_fp8()
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, seed=sq)
    with torch.no_grad():
        out, lse = fp8_attention(q, k, v, return_lse=True, qk_dtype=qk_dtype, **opts)
    ref, lse_ref = fp8_attention_reference(q, k, v, return_lse=True, qk_dtype=qk_dtype, **opts)
    assert _rel(out, ref) < SIM_TOL
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert float((lse[fin] - lse_ref[fin]).abs().max()) < 1e-2


# Accuracy vs float64 (head_dim 128, bf16). The acceptance target is rel. error ≤ 2e-2 and
# cosine ≥ 0.999. Values quoted are the exact CPU simulation (tools/fp8_error_table.py,
# results/fp8_error_sim.json, seq 1k/4k/16k); the kernel must also be within 10 % of its own
# simulation's error (no extra loss from the FP8 accumulator over long sequences).
#
# * int8 Q·Kᵀ + 16-bit P·V on N(0, 1): 1.33e-2 … 1.36e-2, cos 0.99991 — the target, asserted.
# * Physics of the other modes (honest bounds, ~1.5× the measured error):
#   - e4m3 Q·Kᵀ: 3 mantissa bits put ~3.6 % rms noise on every score; on nearly uniform
#     attention it reaches the output one-to-one: 3.8e-2 … 4.1e-2 (P·V 16-bit).
#   - e4m3 P·V: P and V each rounded to 3 mantissa bits (~2.5 % rms): 3.8e-2 … 3.9e-2 with int8
#     Q·Kᵀ, 5.2e-2 … 5.5e-2 with e4m3 Q·Kᵀ.
#   - Q with four 20× channels ("outlier"): the per-block Q scale is set by the outliers, so the
#     other channels lose ~20× resolution: 8.4e-2 … 9.1e-2 (int8, block), 4.7e-2 … 6.0e-2 (int8,
#     per-token Q "q_token"), 0.14 … 0.19 (e4m3). No 8-bit per-block/per-token scheme reaches
#     2e-2 here (test_int8_outlier_target below records the gap; an exact per-channel
#     Q/K rebalancing, simulated only, gets 2.2e-2 … 2.8e-2). Keeping the 16 channels with the
#     largest amax|Q|·amax|K̃| in 16-bit (``outlier_channels=16``) does: 8.0e-3 … 1.2e-2
#     simulated (test_outlier_channels_meet_target).
BOUND = {
    ("int8", "normal", "fp16", "block"): 2e-2,  # the acceptance target
    ("int8", "normal", "fp8", "block"): 6e-2,
    ("int8", "outlier", "fp16", "block"): 0.14,
    ("int8", "outlier", "fp8", "block"): 0.15,
    ("int8", "outlier", "fp16", "q_token"): 9e-2,
    ("fp8", "normal", "fp16", "block"): 6e-2,
    ("fp8", "normal", "fp8", "block"): 8e-2,
    ("fp8", "outlier", "fp16", "block"): 0.3,
    ("fp8", "outlier", "fp8", "block"): 0.3,
}


def _accuracy(qk_dtype, kind, pv_dtype, granularity, seq, causal, outlier_channels=0):
    q, k, v = _inputs(1, 2, 2, seq, seq, 128, kind=kind, seed=seq)
    opts = {"causal": causal, "pv_dtype": pv_dtype, "qk_dtype": qk_dtype,
            "granularity": granularity, "outlier_channels": outlier_channels}  # fmt: skip
    with torch.no_grad():
        out = fp8_attention(q, k, v, **opts)
    assert bool(torch.isfinite(out).all())
    rows = torch.arange(0, seq, max(1, seq // 512), device="cuda")
    exact = attention_reference(
        q[:, :, rows].double(), k.double(), v.double(),
        attn_mask=(torch.arange(seq, device="cuda")[None, :] <= rows[:, None]) if causal else None,
    )  # fmt: skip
    sim = fp8_attention_reference(q, k, v, rows=rows, **opts)
    err, sim_err, cos = _rel(out[:, :, rows], exact), _rel(sim, exact), _cos(out[:, :, rows], exact)
    sage = _sage_error(q, k, v, causal, rows, exact)
    print(f"qk={qk_dtype} {kind} pv={pv_dtype} {granularity} hi={outlier_channels} seq={seq} "
          f"causal={causal}: "
          f"rel {err:.4f} (sim {sim_err:.4f}) cos {cos:.5f}; SageAttention {sage}")  # fmt: skip
    return err, sim_err, cos


@pytest.mark.parametrize(("qk_dtype", "kind", "pv_dtype", "granularity"), list(BOUND))
@pytest.mark.parametrize(("seq", "causal"), [(1024, False), (4096, True), (16384, False)])
def test_accuracy_vs_float64(qk_dtype, kind, pv_dtype, granularity, seq, causal):
    _need_fp8()
    err, sim_err, cos = _accuracy(qk_dtype, kind, pv_dtype, granularity, seq, causal)
    assert err < BOUND[(qk_dtype, kind, pv_dtype, granularity)]
    assert err < 1.1 * sim_err + 2e-3
    if (qk_dtype, kind, pv_dtype) == ("int8", "normal", "fp16"):
        assert cos >= 0.999


@pytest.mark.xfail(
    strict=True,
    reason="Q channel outliers (four 20× channels) exceed 2e-2 with every 8-bit scale scheme "
    "measured: 4.7e-2–6.0e-2 at best (int8, per-token Q, head_dim 128); see docs/kernels/fp8.md",
)
@pytest.mark.parametrize(("seq", "causal"), [(1024, False), (4096, True), (16384, False)])
def test_int8_outlier_target(seq, causal):
    """The acceptance target on the heavy-tailed family — not met; strict xfail records it."""
    _need_fp8()
    err, _, cos = _accuracy("int8", "outlier", "fp16", "q_token", seq, causal)
    assert err <= 2e-2
    assert cos >= 0.999


@pytest.mark.parametrize("pv_dtype", ["fp16", "fp8"])
@pytest.mark.parametrize(("seq", "causal"), [(1024, False), (4096, True), (16384, False)])
def test_outlier_channels_meet_target(seq, causal, pv_dtype):
    """The heavy-tailed family with 16 outlier channels in 16-bit: the 2e-2 / 0.999 target."""
    _need_fp8()
    err, sim_err, cos = _accuracy("int8", "outlier", pv_dtype, "block", seq, causal, 16)
    assert err < 1.1 * sim_err + 2e-3
    if pv_dtype == "fp16":
        assert err <= 2e-2
        assert cos >= 0.999
    else:  # e4m3 P·V keeps its own ~3.8e-2 rounding floor (see above)
        assert err < 6e-2


def test_long_sequence_keeps_accuracy():
    """Two-level accumulation: the error at 16k keys is no worse than at 1k (same statistics)."""
    _need_fp8()
    errs = []
    for seq in (1024, 16384):
        q, k, v = _inputs(1, 2, 2, seq, seq, 64, seed=1)
        with torch.no_grad():
            out = fp8_attention(q, k, v)
        rows = torch.arange(0, seq, seq // 256, device="cuda")
        exact = attention_reference(q[:, :, rows].double(), k.double(), v.double())
        errs.append(_rel(out[:, :, rows], exact))
    assert errs[1] < 1.2 * errs[0] + 2e-3, errs


def test_torch_compile_and_opcheck():
    _need_fp8()
    from adaattn_kernels.fp8.op import fp8_attention_op

    q, k, v = _inputs(1, 4, 2, 300, 300, 64, seed=5)
    for qk_int8 in (True, False):
        torch.library.opcheck(fp8_attention_op, (q, k, v, 2, 0.125, True, "block", 128, qk_int8))
    fn = torch.compile(lambda q, k, v: fp8_attention(q, k, v, causal=True), fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v)
        ref = fp8_attention(q, k, v, causal=True)
    assert torch.equal(out, ref)
