"""GPU tests of the FP8 attention kernels (quantisation, accuracy vs float64, compile, opcheck).

Cheap by design (well under a minute after compilation on an H100): one or two heads per
long-sequence case, float64 references computed in query chunks.
"""

from __future__ import annotations

import pytest
import torch
from adaattn_kernels import attention_reference
from adaattn_kernels.fp8 import fp8_attention, fp8_attention_reference, quantize_fp8_triton
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


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_quantisation_bit_exact_on_gpu(granularity):
    _need_fp8()
    q, k, v = _inputs(2, 4, 4, 1000, 1000, 128, kind="outlier")
    for x in (q, k):
        ref_q, ref_s = quantize_fp8(x, granularity=granularity)
        got_q, got_s = quantize_fp8_triton(x, granularity=granularity)
        assert torch.equal(got_s, ref_s)
        assert torch.equal(got_q.view(torch.uint8), ref_q.view(torch.uint8))
    ref_t, ref_ts = quantize_fp8(v.transpose(-1, -2), granularity="token")
    got_t, got_ts = quantize_channels_t(v, pad_to=128)
    assert torch.equal(got_ts, ref_ts)
    assert torch.equal(got_t[..., :1000].view(torch.uint8), ref_t.view(torch.uint8))


# Kernel vs its float8 simulation. Same quantisation; the differences are Hopper's reduced-
# precision FP8 accumulator inside one tile (~14 bits), which can move a rare probability across
# an e4m3 boundary, and bf16 output rounding (2^-9). 1e-2 is 4× below the FP8 error itself.
SIM_TOL = 1e-2


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "opts"),
    [
        (2, 4, 4, 1024, 1024, 128, {}),
        (2, 8, 2, 1000, 1500, 64, {"causal": True}),
        (1, 4, 1, 1500, 1000, 128, {"causal": True, "pv_dtype": "fp16"}),
        (1, 4, 2, 777, 777, 64, {"causal": "top_left", "granularity": "token"}),
        (1, 2, 2, 513, 2049, 128, {"block_size": 64, "pv_dtype": "fp16"}),
    ],
)
def test_kernel_matches_simulation(b, hq, hkv, sq, sk, d, opts):
    _need_fp8()
    q, k, v = _inputs(b, hq, hkv, sq, sk, d, seed=sq)
    with torch.no_grad():
        out, lse = fp8_attention(q, k, v, return_lse=True, **opts)
    ref, lse_ref = fp8_attention_reference(q, k, v, return_lse=True, **opts)
    assert _rel(out, ref) < SIM_TOL
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert float((lse[fin] - lse_ref[fin]).abs().max()) < 1e-2


# Accuracy vs float64. e4m3's 3 mantissa bits put ~3.6 % relative noise on every score (see
# test_fp8_reference.py); on i.i.d. N(0,1) inputs attention is nearly uniform and that noise
# reaches the output one-to-one: ~5e-2 (P·V e4m3) / ~4e-2 (P·V bf16) measured on the float8
# simulation. With four 20× channels in Q the scores are ~4× larger and so is their noise
# (~0.11–0.16 measured). The bounds are 1.5× those; the kernel must also be within 10 % of its
# own simulation's error (no extra loss from the FP8 accumulator over long sequences) and be
# finite. The cosine similarity is printed (it follows from the error: cos ≈ 1 − err²/2).
BOUND = {("normal", "fp8"): 8e-2, ("normal", "fp16"): 6e-2,
         ("outlier", "fp8"): 0.25, ("outlier", "fp16"): 0.25}  # fmt: skip


@pytest.mark.parametrize("kind", ["normal", "outlier"])
@pytest.mark.parametrize("pv_dtype", ["fp8", "fp16"])
@pytest.mark.parametrize(("seq", "causal"), [(1024, False), (4096, True), (16384, False)])
def test_accuracy_vs_float64(kind, pv_dtype, seq, causal):
    _need_fp8()
    q, k, v = _inputs(1, 2, 2, seq, seq, 128, kind=kind, seed=seq)
    with torch.no_grad():
        out = fp8_attention(q, k, v, causal=causal, pv_dtype=pv_dtype)
    assert bool(torch.isfinite(out).all())
    rows = torch.arange(0, seq, max(1, seq // 512), device="cuda")
    exact = attention_reference(
        q[:, :, rows].double(), k.double(), v.double(),
        attn_mask=(torch.arange(seq, device="cuda")[None, :] <= rows[:, None]) if causal else None,
    )  # fmt: skip
    sim = fp8_attention_reference(q, k, v, causal=causal, pv_dtype=pv_dtype, rows=rows)
    err, sim_err = _rel(out[:, :, rows], exact), _rel(sim, exact)
    sage = _sage_error(q, k, v, causal, rows, exact)
    print(f"{kind} pv={pv_dtype} seq={seq} causal={causal}: rel {err:.4f} (sim {sim_err:.4f}) "
          f"cos {_cos(out[:, :, rows], exact):.5f}; SageAttention {sage}")  # fmt: skip
    assert err < BOUND[(kind, pv_dtype)]
    assert err < 1.1 * sim_err + 2e-3


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
    torch.library.opcheck(fp8_attention_op, (q, k, v, 2, 0.125, True, "block", 128))
    fn = torch.compile(lambda q, k, v: fp8_attention(q, k, v, causal=True), fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v)
        ref = fp8_attention(q, k, v, causal=True)
    assert torch.equal(out, ref)
