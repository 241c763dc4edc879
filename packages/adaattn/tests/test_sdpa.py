"""Exact mode of ``adaattn.scaled_dot_product_attention`` against ``torch`` SDPA.

The reference is PyTorch's math backend in float64 (the backend that defines SDPA's semantics:
CPU's fused kernel silently ignores ``attn_mask`` under ``is_causal`` and zeroes NaN rows).
AdaAttn's exact path computes the same formula in float64 for float64 inputs, so the two agree to
a few float64 ulps of the output (we allow 1e-10 absolute on outputs of size O(1)).
"""

from __future__ import annotations

import math
import warnings

import adaattn
import pytest
import torch
import torch.nn.functional as F
from adaattn import AdaAttnFallbackWarning, SDPAArgumentError, SDPATypeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

F64_ATOL = 1e-10


def torch_sdpa(*args: object, **kwargs: object) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)  # type: ignore[arg-type]


@st.composite
def sdpa_cases(draw: st.DrawFn) -> dict[str, object]:
    """Random SDPA calls: leading dims, GQA, broadcasting, masks, causal, scale, Ev != E."""
    n_lead = draw(st.integers(0, 3))
    hq = draw(st.sampled_from([1, 2, 4, 6])) if n_lead >= 1 else 1
    batch = [draw(st.integers(1, 3)) for _ in range(max(n_lead - 1, 0))]
    enable_gqa = n_lead >= 1 and draw(st.booleans())
    if enable_gqa:
        hk = draw(st.sampled_from([d for d in range(1, hq + 1) if hq % d == 0]))
        hv = (
            hk
            if draw(st.booleans())
            else draw(st.sampled_from([d for d in range(1, hq + 1) if hq % d == 0]))
        )
    else:
        hk = draw(st.sampled_from([hq, 1]))
        hv = hk
    lead_q = [*batch, hq] if n_lead else []
    # key/value may broadcast over batch dims (size 1) or drop leading dims entirely
    kb = [draw(st.sampled_from([b, 1])) for b in batch]
    lead_k = [*kb, hk] if n_lead else []
    lead_v = [*kb, hv] if n_lead else []
    drop = draw(st.integers(0, max(len(batch) - 1, 0))) if batch and all(b == 1 for b in kb) else 0
    lead_k, lead_v = lead_k[drop:], lead_v[drop:]
    seq_q, seq_k = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    e = draw(st.sampled_from([1, 3, 8, 16]))
    ev = draw(st.sampled_from([e, 2, 5, 16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(*lead_q, seq_q, e, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead_k, seq_k, e, generator=gen, dtype=torch.float64)
    v = torch.randn(*lead_v, seq_k, ev, generator=gen, dtype=torch.float64)
    kind = draw(st.sampled_from(["none", "causal", "bool", "float32", "float64"]))
    mask = None
    if kind in ("bool", "float32", "float64"):
        full = [*lead_q, seq_q, seq_k]
        rank = draw(st.integers(0, len(full)))
        shape = [s if draw(st.booleans()) else 1 for s in full[len(full) - rank :]]
        if kind == "bool":
            mask = torch.rand(tuple(shape), generator=gen) > 0.3
        else:
            mask = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
            mask = mask.masked_fill(torch.rand(tuple(shape), generator=gen) < 0.2, -math.inf)
            mask = mask.to(torch.float32 if kind == "float32" else torch.float64)
    scale = draw(st.sampled_from([None, 0.37, 2.0, -0.5, 0.0]))
    return {
        "query": q,
        "key": k,
        "value": v,
        "attn_mask": mask,
        "is_causal": kind == "causal",
        "scale": scale,
        "enable_gqa": enable_gqa,
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sdpa_cases())
def test_exact_matches_torch_sdpa(case: dict[str, object]) -> None:
    ref = torch_sdpa(**case)
    out = adaattn.scaled_dot_product_attention(**case)  # type: ignore[arg-type]
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=F64_ATOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        # Kernel accumulates in float32 and rounds the output once to the input dtype:
        # error ≈ half an ulp of an O(1) output (bf16 2^-9, fp16 2^-12) plus float32 sums.
        (torch.bfloat16, 8e-3),
        (torch.float16, 1e-3),
        (torch.float32, 2e-6),
    ],
)
def test_low_precision_against_float64(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 67, 64, generator=gen).to(dtype)
    k = torch.randn(2, 2, 67, 64, generator=gen).to(dtype)
    v = torch.randn(2, 2, 67, 64, generator=gen).to(dtype)
    out = adaattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = torch_sdpa(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_gradients_match_torch() -> None:
    gen = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = mk(2, 4, 6, 8), mk(2, 2, 9, 8), mk(2, 2, 9, 5)
    mask = mk(1, 4, 6, 9)
    grads = []
    for fn in (adaattn.scaled_dot_product_attention, torch_sdpa):
        out = fn(q, k, v, attn_mask=mask, enable_gqa=True)
        (g,) = torch.autograd.grad((out * out.detach().sin()).sum(), [q], retain_graph=False)
        out = fn(q, k, v, attn_mask=mask, enable_gqa=True)
        grads.append([g, *torch.autograd.grad(out.square().sum(), [k, v, mask])])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _args(**over: object) -> dict[str, object]:
    gen = torch.Generator().manual_seed(3)
    base: dict[str, object] = {
        "query": torch.randn(2, 4, 5, 8, generator=gen),
        "key": torch.randn(2, 4, 7, 8, generator=gen),
        "value": torch.randn(2, 4, 7, 8, generator=gen),
    }
    base.update(over)
    return base


BAD_CALLS = {
    "key dtype": lambda: _args(key=torch.randn(2, 4, 7, 8, dtype=torch.float64)),
    "value dtype": lambda: _args(value=torch.randn(2, 4, 7, 8, dtype=torch.float64)),
    "integer inputs": lambda: {k: t.long() for k, t in _args().items()},  # type: ignore[union-attr]
    "causal with mask": lambda: _args(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True),
    "heads differ without gqa": lambda: _args(
        key=torch.randn(2, 2, 7, 8), value=torch.randn(2, 2, 7, 8)
    ),
    "gqa heads do not divide": lambda: _args(
        query=torch.randn(2, 6, 5, 8),
        key=torch.randn(2, 4, 7, 8),
        value=torch.randn(2, 4, 7, 8),
        enable_gqa=True,
    ),
    "kv heads exceed q heads": lambda: _args(query=torch.randn(2, 2, 5, 8), enable_gqa=True),
    "head dim differs": lambda: _args(key=torch.randn(2, 4, 7, 6)),
    "kv length differs": lambda: _args(value=torch.randn(2, 4, 6, 8)),
    "mask shape": lambda: _args(attn_mask=torch.ones(5, 6, dtype=torch.bool)),
    "mask enlarges": lambda: _args(attn_mask=torch.ones(3, 2, 4, 5, 7, dtype=torch.bool)),
    "integer mask": lambda: _args(attn_mask=torch.ones(5, 7, dtype=torch.int64)),
    "float16 mask for float32": lambda: _args(attn_mask=torch.zeros(5, 7, dtype=torch.float16)),
    "1-D inputs": lambda: {"query": torch.randn(8), "key": torch.randn(8), "value": torch.randn(8)},
    "dropout above 1": lambda: _args(dropout_p=1.5),
    "batch not broadcastable": lambda: _args(
        key=torch.randn(3, 4, 7, 8), value=torch.randn(3, 4, 7, 8)
    ),
    "gqa on 2-D inputs": lambda: {
        "query": torch.randn(5, 8),
        "key": torch.randn(7, 8),
        "value": torch.randn(7, 8),
        "enable_gqa": True,
    },
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_errors_where_torch_errors(name: str) -> None:
    args = BAD_CALLS[name]()
    with pytest.raises((RuntimeError, IndexError)):
        torch_sdpa(**args)
    with pytest.raises(RuntimeError) as info:
        adaattn.scaled_dot_product_attention(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, (SDPAArgumentError, SDPATypeError))


def test_non_tensor_is_type_error() -> None:
    with pytest.raises(TypeError, match="query"):
        adaattn.scaled_dot_product_attention([1.0], torch.randn(2, 2), torch.randn(2, 2))  # type: ignore[arg-type]


def test_negative_dropout_is_rejected() -> None:
    with pytest.raises(ValueError, match="dropout"):
        adaattn.scaled_dot_product_attention(**_args(dropout_p=-0.1))  # type: ignore[arg-type]


def test_config_must_be_a_config() -> None:
    with pytest.raises(TypeError, match="config"):
        adaattn.scaled_dot_product_attention(**_args(), config="exact")  # type: ignore[arg-type]


def test_nan_propagates_like_sdpa() -> None:
    args = _args()
    q, k = args["query"].clone(), args["key"].clone()  # type: ignore[union-attr]
    q[0, 1, 2, 3] = math.nan  # one query row
    k[1, 2, 4, 0] = math.nan  # one key: every row of that head sees it
    for case in ({"query": q}, {"key": k}):
        a = adaattn.scaled_dot_product_attention(**{**args, **case})  # type: ignore[arg-type]
        b = torch_sdpa(**{**args, **case})
        assert a.isnan().any()
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_fully_masked_rows_are_zero_like_sdpa_math() -> None:
    args = _args()
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    a = adaattn.scaled_dot_product_attention(**args, attn_mask=mask)  # type: ignore[arg-type]
    b = torch_sdpa(**args, attn_mask=mask)
    assert torch.all(a[..., 2, :] == 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_causal_is_top_left_when_queries_outnumber_keys() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 4, 8, generator=gen, dtype=torch.float64).unbind(0)
    a = adaattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(a, torch_sdpa(q, k, v, is_causal=True), atol=F64_ATOL, rtol=0)
    # query 0 sees key 0 only (top-left), not the bottom-right diagonal
    torch.testing.assert_close(a[:, :, 0], v[:, :, 0], atol=F64_ATOL, rtol=0)


def test_dropout_falls_back_to_torch_and_says_so() -> None:
    adaattn.reset_dispatch_stats()
    args = _args(dropout_p=0.25)
    torch.manual_seed(5)
    with pytest.warns(AdaAttnFallbackWarning, match="dropout"):
        a = adaattn.scaled_dot_product_attention(**args)  # type: ignore[arg-type]
    torch.manual_seed(5)
    b = F.scaled_dot_product_attention(**args)  # type: ignore[arg-type]
    torch.testing.assert_close(a, b)
    stats = adaattn.dispatch_stats()
    assert stats.exact == 0
    assert sum(stats.fallback.values()) == 1
    assert "dropout" in next(iter(stats.fallback))


def test_empty_inputs_fall_back_and_match() -> None:
    adaattn.reset_dispatch_stats()
    for args in (
        _args(query=torch.randn(2, 4, 0, 8)),
        _args(key=torch.randn(2, 4, 0, 8), value=torch.randn(2, 4, 0, 8)),
        _args(
            query=torch.randn(0, 4, 5, 8),
            key=torch.randn(0, 4, 7, 8),
            value=torch.randn(0, 4, 7, 8),
        ),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdaAttnFallbackWarning)
            a = adaattn.scaled_dot_product_attention(**args)  # type: ignore[arg-type]
        b = torch_sdpa(**args)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    assert adaattn.dispatch_stats().fallback == {"empty input tensor (a dimension of size 0)": 3}


def test_exact_calls_are_counted() -> None:
    adaattn.reset_dispatch_stats()
    adaattn.scaled_dot_product_attention(**_args())  # type: ignore[arg-type]
    adaattn.scaled_dot_product_attention(**_args(), config=adaattn.AdaAttnConfig())  # type: ignore[arg-type]
    stats = adaattn.dispatch_stats()
    assert (stats.exact, stats.adaptive, stats.total) == (2, 0, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["causal", "bool", "float", "none"])
def test_exact_on_cuda_matches_float64(dtype: torch.dtype, kind: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(12)
    mk = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)
    q, k, v = mk(2, 8, 1000, 128), mk(2, 2, 1000, 128), mk(2, 2, 1000, 128)
    mask: torch.Tensor | None = None
    if kind == "bool":
        mask = torch.rand(2, 1, 1000, 1000, generator=gen, device="cuda") > 0.1
    elif kind == "float":
        mask = torch.randn(1, 8, 1000, 1000, generator=gen, device="cuda")
    args = {"attn_mask": mask, "is_causal": kind == "causal", "enable_gqa": True}
    out = adaattn.scaled_dot_product_attention(q, k, v, **args)  # type: ignore[arg-type]
    ref = torch_sdpa(q.double(), k.double(), v.double(), **args)
    # fp32 accumulation on tensor cores, one rounding of an O(1) output to the 16-bit dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
