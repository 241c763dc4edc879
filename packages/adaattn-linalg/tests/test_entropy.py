from __future__ import annotations

import math
import resource
import subprocess
import sys

import pytest
import torch
from adaattn_linalg import (
    entropy,
    entropy_from_logits,
    multiscale_entropy,
    sampled_entropy,
    streaming_entropy,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_testing import dense_entropy, dense_scores

# fp32 streaming vs float64 dense: scores carry ~1e-7 relative rounding, and the entropy is a
# smooth function of them with O(1) sensitivity, so 1e-5 absolute is the acceptance target.
FP32_ATOL = 1e-5


def _qk(b, hq, hkv, sq, sk, d, seed, dtype=torch.float32, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, sq, d, generator=g) * spread).to(dtype)
    k = (torch.randn(b, hkv, sk, d, generator=g) * spread).to(dtype)
    return q, k


# ----------------------------------------------------------------------------- dense


def test_entropy_of_probs_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    ref = dense_entropy(logits)
    torch.testing.assert_close(entropy(p), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy(p.float()), ref.float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy_from_logits(logits), ref, rtol=0, atol=1e-12)
    # other dim
    torch.testing.assert_close(entropy(p.transpose(1, 2), dim=1), ref, rtol=0, atol=1e-12)


def test_entropy_uniform_and_one_hot_extremes():
    n = 64
    uni = torch.full((2, n), 1.0 / n)
    torch.testing.assert_close(entropy(uni), torch.full((2,), math.log(n)))
    torch.testing.assert_close(entropy(uni, normalize=True), torch.ones(2))
    one_hot = torch.zeros(2, n)
    one_hot[:, 3] = 1
    assert torch.equal(entropy(one_hot), torch.zeros(2))
    # near-uniform / near-one-hot logits
    s = torch.zeros(1, n, dtype=torch.float64)
    s[0, 0] = 60.0
    h = entropy_from_logits(s)
    assert 0 < float(h) < 1e-20
    torch.testing.assert_close(h, dense_entropy(s), rtol=1e-6, atol=0)


def test_logits_large_offsets_are_stable():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 100, generator=g, dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(s + 1e4), dense_entropy(s), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        entropy_from_logits((s + 1e3).float()), dense_entropy(s).float(), atol=2e-4, rtol=0
    )


def test_masked_and_fully_masked_rows_have_no_nan():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 30, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 30, generator=g) > 0.5
    mask[2] = False  # fully masked row
    mask[3] = False
    mask[3, 7] = True  # single key
    h = entropy_from_logits(s, mask=mask)
    ref = dense_entropy(s.masked_fill(~mask, float("-inf")))
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, ref, atol=1e-12, rtol=0)
    assert h[2] == 0
    assert h[3] == 0
    hn = entropy_from_logits(s, mask=mask, normalize=True)
    counts = mask.sum(-1).double()
    exp_n = torch.where(counts > 1, ref / counts.clamp_min(2).log(), 0.0)
    torch.testing.assert_close(hn, exp_n, atol=1e-12, rtol=0)
    # -inf logits are the same as a mask
    h2 = entropy_from_logits(s.masked_fill(~mask, float("-inf")), normalize=True)
    torch.testing.assert_close(h2, hn, atol=1e-12, rtol=0)
    # probabilities with a mask
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(entropy(p, mask=mask, normalize=True), hn, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 50, generator=g).to(dtype)
    h = entropy_from_logits(s)
    assert h.dtype == torch.float32
    # reference on the same (rounded) half values: only fp32 arithmetic error remains
    torch.testing.assert_close(h, dense_entropy(s.double()).float(), atol=2e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 70),
    temp=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_dense_entropy_property(rows, n, temp, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, n, generator=g, dtype=torch.float64) * temp).to(dtype)
    ref = dense_entropy(s.double())
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    h = entropy_from_logits(s)
    torch.testing.assert_close(h.double(), ref, atol=tol, rtol=0)
    assert (h >= 0).all()
    assert (h <= math.log(n) + tol).all()
    torch.testing.assert_close(entropy(torch.softmax(s, -1)).double(), ref, atol=tol * 10, rtol=0)


def test_probs_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        entropy(torch.full((2, 4), 0.3))
    with pytest.raises(ValueError, match="negative"):
        entropy(torch.tensor([[1.5, -0.5]]))
    with pytest.raises(TypeError, match="probs"):
        entropy(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="empty"):
        entropy(torch.empty(0, 3))
    with pytest.raises(ValueError, match="mask"):
        entropy_from_logits(torch.zeros(2, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        entropy_from_logits(torch.zeros(2, 3), mask=torch.ones(2, 3))
    assert entropy(torch.zeros(1, 5))[0] == 0  # all-zero row = fully masked


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("sq", "sk"), [(64, 64), (37, 101), (101, 37), (1, 50)])
def test_streaming_matches_dense(causal, sq, sk):
    q, k = _qk(2, 4, 2, sq, sk, 16, seed=sq * 1000 + sk, spread=2.0)  # GQA 4:2
    ref = dense_entropy(dense_scores(q, k, causal=causal))
    h = streaming_entropy(q, k, causal=causal, block_q=16, block_k=24)
    assert h.shape == (2, 4, sq)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), ref, atol=FP32_ATOL, rtol=0)
    # default tiles (one tile here) give the same numbers
    h_default = streaming_entropy(q, k, causal=causal)
    torch.testing.assert_close(h_default, h, atol=FP32_ATOL, rtol=0)


def test_streaming_float64_exact_and_top_left_alignment():
    q, k = _qk(1, 2, 2, 20, 33, 8, seed=4, dtype=torch.float64)
    for align in ("bottom_right", "top_left"):
        ref = dense_entropy(dense_scores(q, k, causal=True, alignment=align))
        h = streaming_entropy(q, k, causal=align, block_q=7, block_k=5)
        torch.testing.assert_close(h, ref, atol=1e-12, rtol=0)
    # SDPA's is_causal is top-left: its attention weights give the same entropy
    s = dense_scores(q, k, causal=True, alignment="top_left")
    torch.testing.assert_close(
        entropy(torch.softmax(s, -1)),
        streaming_entropy(q, k, causal="top_left"),
        atol=1e-12,
        rtol=0,
    )


def test_streaming_with_bool_and_float_masks_and_fully_masked_rows():
    q, k = _qk(2, 2, 1, 30, 40, 8, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 1, 30, 40, generator=g) > 0.4  # broadcast over heads
    mask[0, 0, 3] = False  # fully masked row
    ref = dense_entropy(dense_scores(q, k, mask=mask))
    h = streaming_entropy(q, k, mask=mask, block_q=8, block_k=16)
    assert torch.isfinite(h).all()
    assert (h[0, :, 3] == 0).all()
    torch.testing.assert_close(h.double(), ref, atol=FP32_ATOL, rtol=0)
    hn = streaming_entropy(q, k, mask=mask, normalize=True, block_q=8, block_k=16)
    cnt = mask.expand(2, 2, 30, 40).sum(-1).double()
    torch.testing.assert_close(
        hn.double(), torch.where(cnt > 1, ref / cnt.clamp_min(2).log(), 0.0), atol=FP32_ATOL, rtol=0
    )
    additive = torch.zeros(30, 40).masked_fill(~mask[1, 0], float("-inf"))
    additive[:, :5] += 0.7
    ref2 = dense_entropy(dense_scores(q, k, mask=additive))
    torch.testing.assert_close(
        streaming_entropy(q, k, mask=additive, block_k=16).double(), ref2, atol=FP32_ATOL, rtol=0
    )


def test_streaming_normalize_causal_counts():
    q, k = _qk(1, 1, 1, 12, 12, 4, seed=7, dtype=torch.float64)
    hn = streaming_entropy(q, k, causal=True, normalize=True, block_q=5, block_k=3)
    ref = dense_entropy(dense_scores(q, k, causal=True))
    cnt = torch.arange(1, 13, dtype=torch.float64)
    torch.testing.assert_close(
        hn[0, 0], torch.where(cnt > 1, ref[0, 0] / cnt.log(), 0.0), atol=1e-12, rtol=0
    )
    assert hn[0, 0, 0] == 0


def test_streaming_near_uniform_and_near_one_hot():
    # near uniform: tiny scores; near one-hot: one key aligned with each query, huge scale
    q, k = _qk(1, 1, 1, 50, 50, 32, seed=8, spread=1e-3)
    h = streaming_entropy(q, k, block_k=16)
    torch.testing.assert_close(h, torch.full_like(h, math.log(50)), atol=FP32_ATOL, rtol=0)
    eye = torch.eye(50)[None, None]
    h1 = streaming_entropy(eye, eye, scale=80.0, block_k=16)
    ref = dense_entropy(dense_scores(eye, eye, scale=80.0))
    torch.testing.assert_close(h1.double(), ref, atol=FP32_ATOL, rtol=0)
    assert float(h1.max()) < 1e-20 + FP32_ATOL


def test_streaming_2d_and_leading_dims():
    g = torch.Generator().manual_seed(9)
    q2, k2 = torch.randn(10, 4, generator=g), torch.randn(12, 4, generator=g)
    h = streaming_entropy(q2, k2)
    assert h.shape == (10,)
    torch.testing.assert_close(
        h.double(), dense_entropy(dense_scores(q2, k2)), atol=FP32_ATOL, rtol=0
    )
    q5, k5 = torch.randn(2, 3, 2, 9, 4, generator=g), torch.randn(2, 3, 1, 11, 4, generator=g)
    h5 = streaming_entropy(q5, k5, block_q=4)
    assert h5.shape == (2, 3, 2, 9)
    torch.testing.assert_close(
        h5.double(), dense_entropy(dense_scores(q5, k5)), atol=FP32_ATOL, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streaming_half_inputs(dtype):
    q, k = _qk(1, 2, 2, 40, 40, 16, seed=10, dtype=dtype)
    h = streaming_entropy(q, k, causal=True, block_k=16)
    assert h.dtype == torch.float32
    ref = dense_entropy(dense_scores(q, k, causal=True))  # same rounded inputs, float64
    torch.testing.assert_close(h.double(), ref, atol=FP32_ATOL, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    d=st.sampled_from([1, 3, 8]),
    causal=st.booleans(),
    bq=st.integers(1, 17),
    bk=st.integers(1, 17),
    seed=st.integers(0, 1000),
)
def test_streaming_property(b, hkv, group, sq, sk, d, causal, bq, bk, seed):
    q, k = _qk(b, hkv * group, hkv, sq, sk, d, seed=seed, spread=1.5)
    ref = dense_entropy(dense_scores(q, k, causal=causal))
    h = streaming_entropy(q, k, causal=causal, block_q=bq, block_k=bk)
    torch.testing.assert_close(h.double(), ref, atol=FP32_ATOL, rtol=0)


def test_streaming_validation_names_argument():
    q, k = _qk(1, 4, 2, 8, 8, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of key heads"):
        streaming_entropy(q, k[:, :1].expand(1, 3, 8, 4))
    with pytest.raises(ValueError, match="head_dim"):
        streaming_entropy(q, k[..., :3])
    with pytest.raises(ValueError, match="`q`"):
        streaming_entropy(q.clone().fill_(float("nan")), k)
    with pytest.raises(TypeError, match="`k`"):
        streaming_entropy(q, k.long())
    with pytest.raises(ValueError, match="mask"):
        streaming_entropy(q, k, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        streaming_entropy(q, k, mask=torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal"):
        streaming_entropy(q, k, causal="left")
    with pytest.raises(TypeError, match="causal"):
        streaming_entropy(q, k, causal=1)
    with pytest.raises(ValueError, match="block_q"):
        streaming_entropy(q, k, block_q=0)
    with pytest.raises(ValueError, match="scale"):
        streaming_entropy(q, k, scale=-1.0)
    with pytest.raises(ValueError, match="empty"):
        streaming_entropy(q[:, :, :0], k)
    with pytest.raises(ValueError, match="batch dims"):
        streaming_entropy(q, torch.cat([k, k]))


def _streaming_rss_growth(seq: int, head_dim: int) -> int:
    """Peak-RSS growth (bytes) of one causal ``streaming_entropy`` call, in a fresh process."""
    code = (
        "import resource, torch\n"
        "from adaattn_linalg import streaming_entropy\n"
        "torch.manual_seed(0)\n"
        f"q = torch.randn(1, 2, {seq}, {head_dim}); k = torch.randn(1, 2, {seq}, {head_dim})\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "h = streaming_entropy(q, k, causal=True)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"assert torch.isfinite(h).all() and h.shape == (1, 2, {seq})\n"
        "print((after - before) * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_streaming_cpu_seq_8192_memory_bounded():
    """seq 8192, head_dim 128 on CPU: RSS grows far less than the dense fp32 score matrices,
    and doubling the sequence does not grow it (a quadratic path would quadruple it)."""
    grew = _streaming_rss_growth(8192, 128)
    dense = 2 * 8192 * 8192 * 4  # the fp32 score matrices of the two heads
    assert grew < dense, f"streaming entropy grew RSS by {grew / 2**20:.0f} MiB"
    # The working set is one tile of ~2^24 scores (64 MiB in fp32, a few copies of it in
    # temporaries) whatever the length, plus O(seq) row statistics. Dense scores would grow
    # 4× from seq 4096 (128 MiB) to 8192 (512 MiB); a linear path at most 2×. Peak RSS of the
    # same call moves by up to ~90 MiB between runs (allocator and thread-pool buffers; on
    # one 2-core machine 135 → 223 MiB inside a CI run, 319 → 343–371 MiB in three runs
    # alone), so the bound is the linear one plus 64 MiB, which a quadratic path exceeds.
    small = _streaming_rss_growth(4096, 128)
    assert grew < 2 * small + 64 * 2**20, (small / 2**20, grew / 2**20)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 3 * 2**30


# ----------------------------------------------------------------------------- sampled


def test_sampled_entropy_ci_covers_true_mean():
    q, k = _qk(1, 8, 8, 512, 512, 16, seed=11, spread=1.3)
    full = dense_entropy(dense_scores(q, k, causal=True))  # (1, 8, 512)
    true_mean = full.mean(-1)
    covered, total = 0, 0
    for seed in range(20):
        r = sampled_entropy(q, k, num_samples=48, causal=True, seed=seed, confidence=0.95)
        assert r.mean.shape == (1, 8)
        assert r.values.shape == (1, 8, 48)
        # exact per-row values of the sampled rows
        torch.testing.assert_close(r.values.double(), full[..., r.rows], atol=FP32_ATOL, rtol=0)
        assert (r.low <= r.mean).all()
        assert (r.mean <= r.high).all()
        covered += int(((r.low <= true_mean) & (true_mean <= r.high)).sum())
        total += true_mean.numel()
    # 160 intervals at 95 %: coverage below 85 % has probability < 1e-6 if the CI is right
    assert covered / total > 0.85, covered / total


def test_sampled_entropy_deterministic_and_all_rows():
    q, k = _qk(2, 2, 1, 30, 30, 8, seed=12)
    a = sampled_entropy(q, k, num_samples=10, seed=3)
    b = sampled_entropy(q, k, num_samples=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.rows, b.rows)
    assert torch.equal(a.mean, b.mean)
    assert a.rows.unique().numel() == 10
    full = sampled_entropy(q, k, num_samples=100, seed=0)
    assert full.rows.numel() == 30
    assert torch.equal(full.std_error, torch.zeros(2, 2))
    torch.testing.assert_close(
        full.mean.double(), dense_entropy(dense_scores(q, k)).mean(-1), atol=FP32_ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="num_samples"):
        sampled_entropy(q, k, num_samples=1)
    with pytest.raises(ValueError, match="confidence"):
        sampled_entropy(q, k, num_samples=4, confidence=1.0)
    with pytest.raises(ValueError, match="seed"):
        sampled_entropy(q, k, num_samples=4, seed=1, generator=torch.Generator())


# ----------------------------------------------------------------------------- multi-scale


@pytest.mark.parametrize("causal", [False, True])
def test_multiscale_matches_dense(causal):
    q, k = _qk(1, 3, 3, 40, 56, 8, seed=13)
    w = 6
    r = multiscale_entropy(q, k, window=w, causal=causal, block_q=8, block_k=8)
    ref_g = dense_entropy(dense_scores(q, k, causal=causal))
    ref_l = dense_entropy(dense_scores(q, k, causal=causal, window=w))
    torch.testing.assert_close(r.global_entropy.double(), ref_g, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(r.local_entropy.double(), ref_l, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(r.global_mean.double(), ref_g.mean(-1), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(
        r.global_variance.double(), ref_g.var(-1, correction=0), atol=FP32_ATOL, rtol=0
    )
    torch.testing.assert_close(
        r.local_variance.double(), ref_l.var(-1, correction=0), atol=FP32_ATOL, rtol=0
    )
    assert (r.local_mean < r.global_mean).all()  # fewer keys, less entropy for random scores
    rn = multiscale_entropy(q, k, window=w, causal=causal, normalize=True)
    assert (rn.local_entropy <= 1 + 1e-5).all()
    assert (rn.global_entropy <= 1 + 1e-5).all()


def test_multiscale_local_head_detected():
    # keys equal queries + strong scale: mass on the diagonal → local ≈ global entropy
    g = torch.Generator().manual_seed(14)
    x = torch.nn.functional.normalize(torch.randn(1, 2, 64, 32, generator=g), dim=-1)
    q = x.clone()
    q[:, 1] = torch.randn(64, 32, generator=g) * 0.01  # head 1 ≈ uniform
    r = multiscale_entropy(q, x, window=4, scale=40.0)
    gap = (r.global_mean - r.local_mean)[0]
    assert gap[0] < 0.1 < gap[1]
