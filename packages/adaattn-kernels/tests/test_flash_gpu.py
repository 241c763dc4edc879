"""GPU tests of the Triton flash-attention kernels (forward, gradients, compile, opcheck)."""

from __future__ import annotations

import adaattn_kernels
import pytest
import torch
import torch.nn.functional as F
from adaattn_kernels import attention, attention_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    """Skip autotuning (minutes of compiles over many shapes); the bench checks tuned configs."""
    monkeypatch.setenv("ADAATTN_FLASH_AUTOTUNE", "0")


# Relative-error bounds vs float64 (Frobenius). bf16 keeps 8 mantissa bits (unit roundoff 2^-9
# ≈ 2e-3): the output rounding alone costs ~1e-3 and P is rounded to bf16 before P·V, so 1e-2
# leaves headroom; fp16 (2^-11 ≈ 5e-4) gets 5e-3. Both must also be within 1.5× of SDPA's own
# error on the same inputs (plus a tiny absolute slack for the case where both are at rounding).
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)
    q, k, v = mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)
    do = mk(b, hq, sq, d)
    return q, k, v, do


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _sdpa_fn(hq, hkv, sq, sk, causal):
    """SDPA on the same problem (kv heads repeated, bottom-right causal as an explicit mask)."""

    def fn(q, k, v):
        rep = hq // hkv
        k2, v2 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if causal is False:
            return F.scaled_dot_product_attention(q, k2, v2)
        if causal == "top_left":
            return F.scaled_dot_product_attention(q, k2, v2, is_causal=True)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        return F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)

    return fn


CASES = [
    # b, hq, hkv, sq, sk, d, causal
    (2, 4, 4, 1024, 1024, 128, False),
    (2, 4, 4, 1024, 1024, 64, True),
    (1, 8, 2, 777, 777, 128, True),
    (1, 8, 1, 1000, 1537, 64, True),
    (1, 4, 2, 1537, 1000, 128, "top_left"),
    (2, 4, 2, 333, 2049, 64, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "hq", "hkv", "sq", "sk", "d", "causal"), CASES)
def test_forward_backward_vs_float64(b, hq, hkv, sq, sk, d, causal, dtype):
    q, k, v, do = _inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq * 7 + sk + d)
    ours = _grads(lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"), q, k, v, do)
    ref = _grads(
        lambda q, k, v: attention_reference(q, k, v, causal=causal),
        q.double(),
        k.double(),
        v.double(),
        do.double(),
    )
    sdpa = _grads(_sdpa_fn(hq, hkv, sq, sk, causal), q, k, v, do)
    for name, o, r, s in zip(("out", "dq", "dk", "dv"), ours, ref, sdpa):
        err, err_sdpa = _rel(o, r), _rel(s, r)
        assert torch.isfinite(o).all(), name
        assert err <= TOL[dtype], f"{name}: rel err {err:.2e} > {TOL[dtype]}"
        assert err <= 1.5 * err_sdpa + 1e-4, f"{name}: {err:.2e} vs SDPA {err_sdpa:.2e}"


@pytest.mark.parametrize("d", [32, 96, 256])
def test_other_head_dims(d):
    q, k, v, do = _inputs(1, 4, 2, 300, 301, d, torch.bfloat16, seed=d)
    ours = _grads(lambda q, k, v: attention(q, k, v, causal=True, backend="triton"), q, k, v, do)
    ref = _grads(
        lambda q, k, v: attention_reference(q, k, v, causal=True),
        q.double(),
        k.double(),
        v.double(),
        do.double(),
    )
    for name, o, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert _rel(o, r) <= 1e-2, name


def test_masks_and_fully_masked_rows():
    b, hq, hkv, sq, sk, d = 2, 4, 2, 200, 333, 64
    q, k, v, do = _inputs(b, hq, hkv, sq, sk, d, torch.bfloat16, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    keep = torch.rand(b, 1, sq, sk, device="cuda", generator=gen) > 0.4
    keep[:, :, 7] = False  # fully masked query row
    for mask in (keep, torch.where(keep, 0.0, float("-inf")).to(torch.bfloat16)):
        out, lse = attention(q, k, v, attn_mask=mask, return_lse=True, backend="triton")
        assert torch.isfinite(out).all()
        assert (out[:, :, 7] == 0).all()
        assert torch.isneginf(lse[:, :, 7]).all()
        ours = _grads(lambda q, k, v, m=mask: attention(q, k, v, attn_mask=m), q, k, v, do)
        ref = _grads(
            lambda q, k, v, m=mask: attention_reference(q, k, v, attn_mask=m),
            q.double(),
            k.double(),
            v.double(),
            do.double(),
        )
        for name, o, r in zip(("out", "dq", "dk", "dv"), ours, ref):
            assert torch.isfinite(o).all(), name
            assert _rel(o, r) <= 1e-2, name


def test_lse_matches_reference_and_is_differentiable():
    q, k, v, _ = _inputs(1, 2, 1, 257, 300, 128, torch.float16, seed=11)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention(qs, ks, vs, causal=True, return_lse=True, backend="triton")
    (lse.sum() + out.float().square().sum()).backward()
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out_r, lse_r = attention_reference(qr, kr, vr, causal=True, return_lse=True)
    (lse_r.sum() + out_r.square().sum()).backward()
    assert lse.dtype == torch.float32
    assert _rel(lse, lse_r) < 1e-5
    for g, gr in ((qs.grad, qr.grad), (ks.grad, kr.grad), (vs.grad, vr.grad)):
        assert _rel(g, gr) < 5e-3


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.proj(x)
            return adaattn_kernels.attention(q, x, x, causal=True).sum(dim=-1)

    mod = Block()
    x = torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    y_eager = mod(x.detach())
    torch.testing.assert_close(y, y_eager, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(x.grad).all()


def test_opcheck():
    from adaattn_kernels.flash.op import flash_attention_op

    q, k, v, _ = _inputs(1, 4, 2, 70, 90, 64, torch.bfloat16, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.rand(70, 90, device="cuda") > 0.2
    for args in ((q, k, v, None, 2, 0.125), (q, k, v, mask, 1, 0.1)):
        torch.library.opcheck(flash_attention_op, args)


def test_auto_backend_falls_back_for_float32():
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 64, torch.float32, seed=1)
    out = attention(q, k, v, causal=True)  # float32: documented fallback to the reference
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel(out, ref) < 1e-6
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        attention(*(t[..., :48].half() for t in (q, k, v)), backend="triton")


@pytest.mark.parametrize("tma", ["0", "1"])
def test_strided_inputs_and_tma_switch(tma, monkeypatch):
    """BSHD storage seen as BHSD (pointer path) and contiguous inputs with TMA on and off."""
    monkeypatch.setenv("ADAATTN_FLASH_TMA", tma)
    g = torch.Generator(device="cuda").manual_seed(21)
    mk = lambda s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
    q = mk((2, 515, 4, 128)).transpose(1, 2)
    k = mk((2, 515, 2, 128)).transpose(1, 2)
    v = mk((2, 515, 2, 128)).transpose(1, 2)
    for qq, kk, vv in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        out = attention(qq, kk, vv, causal=True, backend="triton")
        ref = attention_reference(qq.double(), kk.double(), vv.double(), causal=True)
        assert _rel(out, ref) <= 1e-2


def test_too_many_batch_heads_is_refused_or_falls_back():
    """CUDA caps grid.y at 65535 programs: backend="triton" refuses, "auto" uses the reference."""
    q, k, v, _ = _inputs(1100, 64, 16, 3, 3, 32, torch.float16, seed=9)
    with pytest.raises(ValueError, match="batch × heads"):
        attention(q, k, v, backend="triton")
    out = attention(q[:, :1].expand(-1, 64, -1, -1), k, v, causal=True)
    assert torch.isfinite(out).all()
