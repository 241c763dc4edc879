"""The Triton flash kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter must be selected before Triton is imported, so these tests only run when the
whole session runs with ``TRITON_INTERPRET=1`` (the ``tests-cpu`` nox session sets it). Shapes are
small: the interpreter executes every program instance in NumPy. The kernels use 32×16 / 16×32
tiles there, so odd lengths exercise ragged tails, causal diagonals that cross tiles, and the
masked/unmasked stage boundaries.
"""

from __future__ import annotations

import os

import pytest
import torch
from adaattn_kernels import attention, attention_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 set before triton is imported (nox -s tests-cpu sets it); "
    "the compiled kernels are covered by the gpu tests",
)

# fp16 inputs, fp32 accumulation in the kernel: errors vs float64 are at fp16 rounding of the
# inputs/outputs and of P before P·V (~3e-4 relative measured); 2e-3 leaves margin while still
# catching any indexing or masking error, which shows up as O(1) relative error.
TOL = 2e-3


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _check(b, hq, hkv, sq, sk, d, *, causal=False, mask=None, seed=0, lse_weight=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).half()
    k = torch.randn(b, hkv, sk, d, generator=g).half()
    v = torch.randn(b, hkv, sk, d, generator=g).half()
    do = torch.randn(b, hq, sq, d, generator=g).half()

    def run(fn, q, k, v, do):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(q, k, v, attn_mask=mask, causal=causal, return_lse=True)
        loss = (out.to(do.dtype) * do).sum()
        if lse_weight:
            loss = loss + lse_weight * torch.where(torch.isinf(lse), 0, lse).sum()
        loss.backward()
        return out.detach(), lse.detach(), q.grad, k.grad, v.grad

    ours = run(lambda *a, **kw: attention(*a, **kw, backend="triton"), q, k, v, do)
    ref = run(attention_reference, q.double(), k.double(), v.double(), do.double())
    names = ("out", "lse", "dq", "dk", "dv")
    for name, o, r in zip(names, ours, ref):
        assert not torch.isnan(o).any(), name
        if name == "lse":
            fin = torch.isfinite(r)
            assert torch.equal(torch.isfinite(o), fin)
            assert _rel(o[fin], r[fin]) < 1e-5
        else:
            assert _rel(o, r) < TOL, f"{name}: {_rel(o, r):.2e}"
    return ours


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "causal"),
    [
        (1, 2, 2, 37, 37, 64, False),
        (1, 2, 2, 37, 37, 64, True),
        (1, 4, 2, 37, 123, 32, True),  # GQA, bottom-right with Sk > Sq
        (1, 4, 1, 123, 37, 32, True),  # MQA, Sq > Sk: first 86 rows fully masked
        (1, 4, 2, 123, 37, 32, "top_left"),
        (2, 2, 1, 45, 70, 96, False),  # head_dim 96 (padded to 128 in registers)
    ],
)
def test_triton_interpreter_matches_reference(b, hq, hkv, sq, sk, d, causal):
    out = _check(b, hq, hkv, sq, sk, d, causal=causal, seed=sq + sk + d)[0]
    if causal is True and sq > sk:
        assert (out[:, :, : sq - sk] == 0).all()


def test_triton_interpreter_masks():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 37, 50, generator=g) > 0.4
    keep[0, 0, 5] = False  # one fully masked row
    out = _check(2, 2, 1, 37, 50, 32, mask=keep, seed=2)[0]
    assert (out[0, :, 5] == 0).all()
    additive = torch.randn(1, 50, generator=g)  # broadcast over batch, heads and queries
    _check(2, 2, 1, 37, 50, 32, mask=additive, causal=True, seed=3)


def test_triton_interpreter_lse_gradient():
    _check(1, 2, 1, 29, 41, 32, causal=True, seed=4, lse_weight=0.5)


def test_triton_interpreter_noncontiguous_inputs():
    g = torch.Generator().manual_seed(7)
    # (B, S, H, D) storage viewed as (B, H, S, D): strided heads and rows.
    q = torch.randn(1, 33, 2, 32, generator=g).half().transpose(1, 2)
    k = torch.randn(1, 40, 2, 32, generator=g).half().transpose(1, 2)
    v = torch.randn(1, 40, 2, 32, generator=g).half().transpose(1, 2)
    out = attention(q, k, v, causal=True, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel(out, ref) < TOL


def test_opcheck_interpreter():
    from adaattn_kernels.flash.op import flash_attention_op

    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 20, 32, generator=g).half().requires_grad_()
    k = torch.randn(1, 1, 24, 32, generator=g).half().requires_grad_()
    v = torch.randn(1, 1, 24, 32, generator=g).half().requires_grad_()
    torch.library.opcheck(
        flash_attention_op,
        (q, k, v, None, 2, 0.2),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("mode", ["split", "quarter", "poly"])
def test_triton_interpreter_polynomial_exp2(mode, monkeypatch):
    # The polynomial exp2 (relative error 7.7e-5) replaces the special-function unit on the
    # unmasked tiles; the result must stay within the same fp16 tolerance. Seq 160 with 32×16
    # tiles gives many unmasked tiles, causal adds the masked diagonal path next to them.
    monkeypatch.setenv("ADAATTN_FLASH_EXP2", mode)
    _check(1, 2, 1, 160, 160, 64, seed=11)
    _check(1, 2, 2, 96, 160, 32, causal=True, seed=12)


def test_exp2_mode_rejects_unknown_names(monkeypatch):
    from adaattn_kernels.flash.op import _exp2_mode

    monkeypatch.setenv("ADAATTN_FLASH_EXP2", "fast")
    with pytest.raises(ValueError, match="ADAATTN_FLASH_EXP2='fast'"):
        _exp2_mode()
