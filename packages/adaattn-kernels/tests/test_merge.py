"""`merge_attention_states_`: two partial results over disjoint key sets fold into one, in place.

The truth is float64 attention over the union of the key sets. The Triton kernel runs on CPU
through the interpreter (``TRITON_INTERPRET=1``, set by ``nox -s tests-cpu``) and on CUDA in the
``gpu`` tests; the reference runs everywhere.
"""

from __future__ import annotations

import os

import pytest
import torch
from adaattn_kernels import attention_reference, merge_attention_states_
from hypothesis import given, settings
from hypothesis import strategies as st

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not _INTERP, reason="the CPU kernel test needs TRITON_INTERPRET=1 (nox -s tests-cpu sets it)"
)

# The merge reads two outputs rounded to `dtype`, combines them in float32 and rounds once more:
# at most ~1.5 units of roundoff of the dtype relative to the output, plus the float32 weights.
# Unit roundoff: bf16 2^-9 ≈ 2e-3, fp16 2^-11 ≈ 5e-4, fp32 2^-24 ≈ 6e-8.
_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}


def _halves(b, h, sq, sk, d, split, *, seed, causal=False):
    """float64 (out, lse) over keys [0, split) and [split, sk), and over all keys."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, sk, d, generator=g, dtype=torch.float64)
    full = attention_reference(q, k, v, causal="top_left" if causal else False, return_lse=True)
    a = attention_reference(
        q, k[:, :, :split], v[:, :, :split], causal="top_left" if causal else False,
        return_lse=True,
    )  # fmt: skip
    # Keys [split, sk) under the global top-left causal mask: query i sees key j iff j ≤ i.
    mask = None
    if causal:
        mask = torch.arange(split, sk)[None, :] <= torch.arange(sq)[:, None]
    b_ = attention_reference(q, k[:, :, split:], v[:, :, split:], attn_mask=mask, return_lse=True)
    return a, b_, full


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def _run(backend, dtype, device, *, b=2, h=3, sq=37, sk=29, d=64, split=11, causal=True, seed=0):
    (oa, la), (ob, lb), (ref_o, ref_l) = _halves(b, h, sq, sk, d, split, seed=seed, causal=causal)
    oa, ob = oa.to(device, dtype), ob.to(device, dtype)
    la, lb = la.to(device, torch.float32), lb.to(device, torch.float32)
    out, lse = merge_attention_states_(oa, la, ob, lb, backend=backend)
    assert out is oa  # in place
    assert lse is la
    fin = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse).cpu(), fin)
    assert _rel(lse.cpu()[fin], ref_l[fin]) < 1e-6
    assert _rel(out.cpu(), ref_o) < _TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_reference_merge_equals_attention_over_the_union(dtype):
    _run("reference", dtype, "cpu")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 48])
def test_kernel_merge_equals_attention_over_the_union_cpu(dtype, d):
    _run("triton", dtype, "cpu", d=d)


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    sq=st.integers(1, 70),
    sk=st.integers(2, 40),
    d=st.sampled_from([16, 32, 40, 64]),
    data=st.data(),
)
def test_kernel_matches_reference_on_row_slices(b, h, sq, sk, d, data):
    """A slice of rows merges in place and leaves every other row untouched."""
    split = data.draw(st.integers(1, sk - 1))
    r0 = data.draw(st.integers(0, sq - 1))
    r1 = data.draw(st.integers(r0 + 1, sq))
    (oa, la), (ob, lb), _ = _halves(b, h, sq, sk, d, split, seed=sq * 131 + sk)
    oa, ob = oa.half(), ob.half()
    la, lb = la.float(), lb.float()
    exp_o, exp_l = oa.clone(), la.clone()
    merge_attention_states_(
        exp_o[:, :, r0:r1], exp_l[:, :, r0:r1], ob[:, :, r0:r1], lb[:, :, r0:r1],
        backend="reference",
    )  # fmt: skip
    merge_attention_states_(
        oa[:, :, r0:r1], la[:, :, r0:r1], ob[:, :, r0:r1], lb[:, :, r0:r1], backend="triton"
    )
    torch.testing.assert_close(la, exp_l, rtol=1e-6, atol=1e-6)
    # fp16 outputs: one rounding each side; the two paths differ by at most one fp16 ulp.
    torch.testing.assert_close(oa, exp_o, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("reference", "cpu"),
        pytest.param("triton", "cpu", marks=needs_interpreter),
        # On the GPU tl.maximum does not pass NaN through as the interpreter's numpy does.
        pytest.param("triton", "cuda", marks=pytest.mark.gpu),
    ],
)
def test_empty_rows_and_nan_rows(backend, device):
    """Rows seeing no key in either set give 0 and -inf; NaN propagates, never masked."""
    g = torch.Generator().manual_seed(3)
    oa, ob = (torch.randn(1, 2, 6, 32, generator=g).half().to(device) for _ in range(2))
    la, lb = (torch.randn(1, 2, 6, generator=g).to(device) for _ in range(2))
    oa[0, 0, 0] = 0.0
    ob[0, 0, 0] = 0.0
    la[0, 0, 0] = lb[0, 0, 0] = float("-inf")
    la[0, 1, 2] = float("-inf")  # only set B: the row becomes B's
    want_b = ob[0, 1, 2].clone()
    lb[0, 0, 4] = float("nan")
    oa[0, 1, 5, 3] = float("nan")
    merge_attention_states_(oa, la, ob, lb, backend=backend)
    assert torch.equal(oa[0, 0, 0], torch.zeros(32, dtype=torch.float16, device=device))
    assert la[0, 0, 0] == float("-inf")
    torch.testing.assert_close(oa[0, 1, 2], want_b)
    assert torch.isnan(la[0, 0, 4])
    assert torch.isnan(oa[0, 0, 4]).all()
    assert torch.isnan(oa[0, 1, 5, 3])
    assert torch.isfinite(oa[0, 0, 1]).all()


def test_zero_rows_is_a_no_op():
    o, lse = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0)
    assert merge_attention_states_(o, lse, o.clone(), lse.clone())[0] is o


def test_bad_inputs_name_the_argument():
    o, lse = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="`out_b` has shape"):
        merge_attention_states_(o, lse, torch.randn(1, 2, 5, 8), lse.clone())
    with pytest.raises(ValueError, match="`lse_b` has shape"):
        merge_attention_states_(o, lse, o.clone(), torch.randn(1, 2, 5))
    with pytest.raises(TypeError, match="`lse` accumulates"):
        merge_attention_states_(o, lse.half(), o.clone(), lse.clone())
    with pytest.raises(TypeError, match="`out_b` must be a floating-point"):
        merge_attention_states_(o, lse, o.long(), lse.clone())
    with pytest.raises(ValueError, match="`out` must be"):
        merge_attention_states_(o[0], lse[0], o[0].clone(), lse[0].clone())
    with pytest.raises(ValueError, match="`backend` must be"):
        merge_attention_states_(o, lse, o.clone(), lse.clone(), backend="cuda")
    if not _INTERP:
        with pytest.raises(ValueError, match="backend='triton' cannot merge"):
            merge_attention_states_(o, lse, o.clone(), lse.clone(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 96])
def test_kernel_merge_gpu(dtype, d):
    _run("triton", dtype, "cuda", b=2, h=4, sq=300, sk=257, d=d, split=100)
