"""Planner: choices meet the budget on structured heads, caching, fallbacks, plan execution."""

from __future__ import annotations

import json
import math

import adaattn
import pytest
import torch
import torch.nn.functional as F
from adaattn import AdaAttnConfig, AdaptiveAttention
from adaattn._sdpa import prepare
from adaattn.planner import AttentionPlan, HeadPlan, Planner, execute_plan
from adaattn.synthetic import structured_qkv

KINDS = ("local", "sink", "diffuse", "content")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) relative Frobenius error, the quantity the planner budgets."""
    return (out - ref).double().flatten(2).norm(dim=-1) / ref.double().flatten(2).norm(dim=-1)


@pytest.fixture(scope="module")
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return structured_qkv(KINDS, seq_len=512, seed=3)


@pytest.fixture(scope="module")
def hybrid_layer(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[AdaptiveAttention, torch.Tensor]:
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=128, sample_size=96)
    attn = AdaptiveAttention(cfg, layer_idx=3)
    with torch.no_grad():
        out = attn(*qkv, is_causal=True)
    return attn, out


def test_structured_heads_get_the_expected_modes(
    hybrid_layer: tuple[AdaptiveAttention, torch.Tensor],
) -> None:
    attn, _ = hybrid_layer
    plan = attn.plan
    assert plan is not None
    assert plan.layer == 3
    modes = [h.mode for h in plan.heads]
    # local, sink and diffuse heads pool their far field well; i.i.d. content heads do not.
    assert modes == ["hybrid", "hybrid", "hybrid", "exact"]
    assert plan.cost < 0.6
    assert "policy 'quality' does not allow FP8" in plan.heads[0].reason
    ent = [h.entropy for h in plan.heads]
    assert ent[0] is not None
    assert ent[2] is not None
    assert ent[0] < 0.4 < 0.9 < ent[2]  # local heads are peaked, diffuse ones near uniform


def test_true_error_meets_the_budget_and_matches_the_estimate(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hybrid_layer: tuple[AdaptiveAttention, torch.Tensor],
) -> None:
    attn, out = hybrid_layer
    ref = F.scaled_dot_product_attention(*qkv, is_causal=True)
    err = rel_err(out, ref)[0]
    plan = attn.plan
    assert plan is not None
    for h, hp in enumerate(plan.heads):
        # Budget 0.05 on the sampled rows; the full-matrix error may exceed the sampled estimate
        # by sampling noise (96 of 512 rows): allow 30 %.
        assert float(err[h]) <= 1.3 * plan.tolerance
        if hp.mode == "exact":
            assert float(err[h]) < 1e-5  # float32 exact kernel vs torch
        else:
            assert math.isclose(float(err[h]), hp.estimated_error, rel_tol=0.5, abs_tol=2e-3)


def test_tiny_tolerance_keeps_every_head_exact(qkv: tuple[torch.Tensor, ...]) -> None:
    cfg = AdaAttnConfig.adaptive(1e-6, policy="quality", min_seq_len=0, sample_size=32)
    q, k, v = (t[:, :, :256] for t in qkv)
    out = adaattn.scaled_dot_product_attention(q, k, v, is_causal=True, config=cfg)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_cost_falls_as_the_tolerance_grows(qkv: tuple[torch.Tensor, ...]) -> None:
    costs = []
    problem = prepare(*(t[:, :, :256] for t in qkv), None, True, None, False)
    for tol in (0.005, 0.05, 0.3):
        cfg = AdaAttnConfig.adaptive(tol, policy="quality", min_seq_len=0, sample_size=32)
        costs.append(Planner(cfg).plan(problem).cost)
    assert costs[0] >= costs[1] >= costs[2]
    assert costs[0] > costs[2]


def test_fp8_heads_on_cpu_simulation_meet_the_budget() -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 256, 64, generator=gen)
    k = torch.randn(1, 2, 256, 64, generator=gen)
    v = torch.randn(1, 2, 256, 64, generator=gen)
    q[:, 1] *= 8.0  # larger logits amplify FP8 score rounding: head 1 measures a larger error
    ref = F.scaled_dot_product_attention(q, k, v)

    def run(tol: float) -> tuple[AttentionPlan, torch.Tensor]:
        cfg = AdaAttnConfig(modes=("exact", "fp8"), tolerance=tol, policy="balanced", min_seq_len=0)
        attn = AdaptiveAttention(cfg)
        with torch.no_grad():
            out = attn(q, k, v)
        assert attn.plan is not None
        return attn.plan, out

    loose, out = run(0.5)  # every head fits: both FP8
    assert [h.mode for h in loose.heads] == ["fp8", "fp8"]
    assert loose.heads[0].precision == "int8/fp8_e4m3"
    assert loose.fp8 is not None
    assert loose.fp8.fmt == "e4m3"
    est = [h.estimated_error for h in loose.heads]
    err = rel_err(out, ref)[0]
    for h in range(2):  # the sampled estimate tracks the head's true output error
        assert math.isclose(float(err[h]), est[h], rel_tol=0.5)
    assert est[1] > 1.1 * est[0]
    mid, out = run((est[0] + est[1]) / 2)  # a budget between the two heads
    assert [h.mode for h in mid.heads] == ["fp8", "exact"]
    err = rel_err(out, ref)[0]
    assert float(err[0]) <= 1.3 * mid.tolerance
    assert float(err[1]) < 1e-5
    tight, out = run(1e-4)  # no FP8 kernel is this accurate
    assert tight.is_exact
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fp8_is_skipped_when_gradients_are_needed() -> None:
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=gen, requires_grad=True) for _ in range(3))
    cfg = AdaAttnConfig(modes=("exact", "fp8"), tolerance=0.5, policy="speed", min_seq_len=0)
    attn = AdaptiveAttention(cfg)
    out = attn(q, k, v)
    out.sum().backward()
    assert attn.plan is not None
    assert attn.plan.is_exact
    assert "no backward" in attn.plan.heads[0].reason
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_hybrid_path_is_differentiable(qkv: tuple[torch.Tensor, ...]) -> None:
    q, k, v = (t.clone().requires_grad_(True) for t in qkv)
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=32)
    attn = AdaptiveAttention(cfg)
    out = attn(q, k, v, is_causal=True)
    assert attn.plan is not None
    assert not attn.plan.is_exact
    (gq,) = torch.autograd.grad(out.square().sum(), [q])
    qr = qkv[0].clone().requires_grad_(True)
    ref = F.scaled_dot_product_attention(qr, k.detach(), v.detach(), is_causal=True)
    (gr,) = torch.autograd.grad(ref.square().sum(), [qr])
    exact_heads = attn.plan.heads_with("exact")
    torch.testing.assert_close(gq[:, exact_heads], gr[:, exact_heads], atol=1e-4, rtol=1e-4)
    hybrid = attn.plan.heads_with("hybrid")
    assert rel_err(gq[:, hybrid], gr[:, hybrid]).max() < 0.5  # approximate, but the same signal


@pytest.mark.parametrize(
    ("replan", "calls", "plans"), [("per_bucket", 3, 1), (2, 3, 2), ("every_call", 3, 3)]
)
def test_replan_cadence(
    qkv: tuple[torch.Tensor, ...], replan: object, calls: int, plans: int
) -> None:
    cfg = AdaAttnConfig.adaptive(
        0.05, policy="quality", min_seq_len=0, sample_size=16, replan=replan
    )  # type: ignore[arg-type]
    attn = AdaptiveAttention(cfg)
    q, k, v = (t[:, :2, :256] for t in qkv)
    with torch.no_grad():
        for _ in range(calls):
            attn(q, k, v, is_causal=True)
    assert attn.stats.calls == calls
    assert attn.stats.plans_made == plans
    assert attn.stats.cache_hits == calls - plans
    assert sum(attn.stats.head_calls.values()) == 2 * calls


def test_cached_plans_reuse_their_prepared_execution(qkv: tuple[torch.Tensor, ...]) -> None:
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=16)
    attn = AdaptiveAttention(cfg)
    q, k, v = (t[:, :, :256] for t in qkv)
    with torch.no_grad():
        first = attn(q, k, v, is_causal=True)
        second = attn(q, k, v, is_causal=True)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    (entry,) = attn.planner._cache.values()
    assert len(entry.prepared) == 1  # built on the first call, reused on the second
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    attn(q2, k2, v2, is_causal=True).sum().backward()  # grad: another prepared entry
    assert len(entry.prepared) == 2
    assert q2.grad is not None


def test_a_new_length_bucket_gets_its_own_plan(qkv: tuple[torch.Tensor, ...]) -> None:
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=16)
    attn = AdaptiveAttention(cfg)
    q, k, v = (t[:, :2] for t in qkv)
    with torch.no_grad():
        attn(q[:, :, :200], k[:, :, :200], v[:, :, :200], is_causal=True)
        attn(q[:, :, :250], k[:, :, :250], v[:, :, :250], is_causal=True)  # same bucket (256)
        attn(q, k, v, is_causal=True)  # bucket 512
    assert attn.stats.plans_made == 2
    assert len(attn.planner.cached_plans) == 2
    attn.reset_plans()
    assert attn.plan is None
    assert not attn.planner.cached_plans


def test_short_masked_and_nonfinite_calls_stay_exact(qkv: tuple[torch.Tensor, ...]) -> None:
    cfg = AdaAttnConfig.adaptive(0.1, policy="quality", min_seq_len=300, sample_size=16)
    q, k, v = (t[:, :2] for t in qkv)
    planner = Planner(cfg)
    short = planner.plan(
        prepare(q[:, :, :100], k[:, :, :100], v[:, :, :100], None, True, None, False)
    )
    assert short.is_exact
    assert "min_seq_len" in short.heads[0].reason
    mask = torch.ones(512, 512, dtype=torch.bool).tril()
    masked = planner.plan(prepare(q, k, v, mask, False, None, False))
    assert masked.is_exact
    assert "attn_mask" in masked.heads[0].reason
    qn = q.clone()
    qn[0, 0, 5, 0] = math.nan
    bad = planner.plan(prepare(qn, k, v, None, True, None, False))
    assert bad.is_exact
    assert "NaN" in bad.heads[0].reason
    out = adaattn.scaled_dot_product_attention(qn, k, v, is_causal=True, config=cfg)
    assert out[0, 0, 5].isnan().all()
    assert not out[0, 1].isnan().any()


def test_a_nonfinite_call_does_not_pin_its_bucket_to_exact(qkv: tuple[torch.Tensor, ...]) -> None:
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=16)
    attn = AdaptiveAttention(cfg)
    q, k, v = (t[:, :2, :256] for t in qkv)
    qn = q.clone()
    qn[0, 0, 7, 0] = math.inf
    with torch.no_grad():
        bad = attn(qn, k, v, is_causal=True)
        assert attn.plan is not None
        assert attn.plan.is_exact
        attn(q, k, v, is_causal=True)
    assert bad[0, 0, 7].isnan().all()
    assert attn.stats.plans_made == 2
    assert not attn.plan.is_exact


def test_single_query_decode_step_plans_without_error() -> None:
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(1, 4, 1, 64, generator=gen)
    k, v = (torch.randn(1, 2, 300, 64, generator=gen) for _ in range(2))
    cfg = AdaAttnConfig.adaptive(0.2, policy="balanced", min_seq_len=0, sample_size=16)
    attn = AdaptiveAttention(cfg)
    with torch.no_grad():
        out = attn(q, k, v, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    plan = attn.plan
    assert plan is not None
    assert all(h.entropy is None for h in plan.heads)  # one row: no entropy sample
    assert "hybrid skipped" in plan.heads[0].reason  # pooling all keys costs more than one row
    assert float(rel_err(out, ref).max()) <= 1.3 * 0.2


def test_execute_plan_mixes_modes_per_head_with_gqa() -> None:
    from adaattn_kernels import attention
    from adaattn_kernels.fp8 import fp8_attention
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 96, 64, generator=gen)
    k = torch.randn(2, 2, 96, 64, generator=gen)
    v = torch.randn(2, 2, 96, 64, generator=gen)
    heads = (
        HeadPlan(0, "exact", "fp32"),
        HeadPlan(1, "fp8", "int8/fp8_e4m3"),
        HeadPlan(2, "hybrid", "fp32", window=16, rank=8, sinks=4),
        HeadPlan(3, "fp8", "int8/fp8_e4m3"),
    )
    from adaattn_precision import FP8Config

    fp8 = FP8Config(granularity="block", block_size=128)
    plan = AttentionPlan(None, 96, 96, True, 0.1, "custom", "cpu", heads, fp8=fp8)
    with torch.no_grad():
        out, modes = execute_plan(prepare(q, k, v, None, True, None, True), plan)
        assert modes == ["exact", "fp8", "hybrid", "fp8"]
        kv = torch.tensor([0, 0, 1, 1])  # query head h reads kv head h // 2
        exact = attention(q, k, v, causal="top_left")
        f8 = fp8_attention(
            q[:, [1, 3]], k[:, kv[[1, 3]]], v[:, kv[[1, 3]]], causal="top_left", qk_dtype="int8"
        )
        hp = HybridPlan.uniform(2, 1, seq_len_k=96, window=16, rank=8, sinks=4)
        hy = hybrid_attention(q[:, [2]], k[:, [1]], v[:, [1]], hp, causal="top_left")
    torch.testing.assert_close(out[:, 0], exact[:, 0])
    torch.testing.assert_close(out[:, [1, 3]], f8)
    torch.testing.assert_close(out[:, [2]], hy)
    with pytest.raises(ValueError, match="heads"):
        execute_plan(prepare(q[:, :2], k[:, :1], v[:, :1], None, True, None, True), plan)


def test_plan_record_is_json_and_readable(
    hybrid_layer: tuple[AdaptiveAttention, torch.Tensor],
) -> None:
    attn, _ = hybrid_layer
    plan = attn.plan
    assert plan is not None
    data = json.loads(json.dumps(plan.to_dict()))
    assert [h["mode"] for h in data["heads"]] == [h.mode for h in plan.heads]
    assert data["tolerance"] == 0.05
    assert plan.mode_counts() == {"hybrid": 3, "exact": 1}
    text = str(plan)
    assert "head   0: hybrid" in text
    assert "w=" in text
    assert plan.max_error == max(h.estimated_error for h in plan.heads)


def test_functional_adaptive_calls_are_counted(qkv: tuple[torch.Tensor, ...]) -> None:
    adaattn.reset_dispatch_stats()
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=16)
    with torch.no_grad():
        adaattn.scaled_dot_product_attention(*qkv, is_causal=True, config=cfg)
    assert adaattn.dispatch_stats().adaptive == 1


def test_planner_rejects_a_non_config() -> None:
    with pytest.raises(TypeError, match="config"):
        Planner("adaptive")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_adaptive_bf16_on_gpu_meets_the_budget() -> None:
    q, k, v = structured_qkv(KINDS * 2, seq_len=4096, seed=5, dtype=torch.bfloat16, device="cuda")
    cfg = AdaAttnConfig.adaptive(0.05, policy="balanced", sample_size=128)
    attn = AdaptiveAttention(cfg)
    with torch.no_grad():
        out = attn(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert attn.plan is not None
    assert not attn.plan.is_exact
    err = rel_err(out, ref)[0]
    # bf16 output rounding adds ~4e-3 on top of the plan's own error.
    assert float(err.max()) <= 1.3 * 0.05 + 8e-3


def test_cached_plan_follows_the_active_policy() -> None:
    """A plan made under one active policy is not reused under another (cache key)."""
    from adaattn_precision import PrecisionPolicy

    q, k, v = structured_qkv(("diffuse", "diffuse"), seq_len=256, seed=11)
    cfg = AdaAttnConfig(modes=("exact", "fp8"), tolerance=None, policy=None, min_seq_len=0)
    attn = AdaptiveAttention(cfg, layer_idx=0)
    with torch.no_grad():
        with PrecisionPolicy.preset("speed"):
            attn(q, k, v)
            speed_plan = attn.plan
        with PrecisionPolicy.preset("quality"):
            attn(q, k, v)
            quality_plan = attn.plan
    assert speed_plan is not None
    assert quality_plan is not None
    assert quality_plan is not speed_plan
    assert all(h.mode == "exact" for h in quality_plan.heads)  # quality forbids FP8
    assert len(attn.planner.cached_plans) == 2


def test_a_missed_hybrid_pick_calibrates_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a measured miss, the next pick must be predicted within tol / (measured/predicted).

    The fake predictor scores every candidate 0.04 but one (w=64, r=32) at 0.02; the fake
    measurement is twice the prediction. The first pick (the cheapest, predicted 0.04) measures
    0.08 > 0.05; calibrated by x2, only the 0.02 candidate qualifies and measures 0.04.
    Uncalibrated, the next picks would be more 0.04 candidates, all missing.
    """
    from types import SimpleNamespace

    from adaattn import planner as planner_mod

    seen: dict[str, tuple[int, ...]] = {}
    measured_picks: list[tuple[int, int]] = []
    seq = 512

    def predicted(w: int, r: int) -> float:
        return 0.02 if (w, r) == (64, 32) else 0.04

    def fake_prediction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> object:
        windows, ranks = kw["windows"], kw["ranks"]
        assert isinstance(windows, tuple)
        assert isinstance(ranks, tuple)
        seen.update(windows=windows, ranks=ranks)
        err = torch.tensor([[predicted(w, r) for r in ranks] for w in windows])
        return SimpleNamespace(error=err.expand(q.shape[0], q.shape[1], -1, -1))

    def fake_measured(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: object, **kw: object
    ) -> torch.Tensor:
        out = torch.zeros(q.shape[0], q.shape[1])
        for h in range(q.shape[1]):
            w = int(plan.window[0, h])  # type: ignore[attr-defined]
            g = int(plan.segment[0, h])  # type: ignore[attr-defined]
            if g == 0:
                continue
            r = next(r for r in seen["ranks"] if -(-seq // r) == g)
            measured_picks.append((w, r))
            out[:, h] = 2 * predicted(w, r)
        return out

    monkeypatch.setattr(planner_mod._backends, "hybrid_prediction", fake_prediction)
    monkeypatch.setattr(planner_mod._backends, "hybrid_measured_error", fake_measured)
    q, k, v = structured_qkv(("diffuse",), seq_len=seq, seed=4)
    cfg = AdaAttnConfig.adaptive(
        0.05, policy="quality", min_seq_len=0, sample_size=32,
        hybrid_windows=(16, 32, 64), hybrid_ranks=(8, 16, 32),
    )  # fmt: skip
    plan = Planner(cfg).plan(prepare(q, k, v, None, True, None, False))
    (head,) = plan.heads
    assert len(measured_picks) == 2
    assert measured_picks[1] == (64, 32)
    assert (head.mode, head.window, head.rank) == ("hybrid", 64, 32)
    assert head.estimated_error == pytest.approx(0.04)
    assert "measured 0.08" in head.reason
    assert "<= tol 0.05" in head.reason


def test_a_head_without_a_predicted_hybrid_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from adaattn import planner as planner_mod

    def fake_prediction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> object:
        windows, ranks = kw["windows"], kw["ranks"]
        assert isinstance(windows, tuple)
        assert isinstance(ranks, tuple)
        assert kw["num_samples"] == 16  # predict_samples, not sample_size
        err = torch.full((q.shape[0], q.shape[1], len(windows), len(ranks)), 0.3)
        err[..., -1, -1] = 0.2
        return SimpleNamespace(error=err)

    monkeypatch.setattr(planner_mod._backends, "hybrid_prediction", fake_prediction)
    q, k, v = structured_qkv(("content",), seq_len=512, seed=4)
    cfg = AdaAttnConfig.adaptive(
        0.05, policy="quality", min_seq_len=0, sample_size=32,
        hybrid_windows=(16, 32), hybrid_ranks=(8, 16), predict_samples=16,
    )  # fmt: skip
    plan = Planner(cfg).plan(prepare(q, k, v, None, True, None, False))
    (head,) = plan.heads
    assert head.mode == "exact"
    assert "no (window, rank) predicted within tol 0.05 on 16 rows" in head.reason
    assert "best w=32 r=16 predicted 0.2" in head.reason


def test_default_grid_keeps_only_candidates_cheaper_than_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large windows and ranks are scored only where they read fewer keys than exact attention."""
    from types import SimpleNamespace

    from adaattn import planner as planner_mod

    scored: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def fake_prediction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> object:
        windows, ranks = kw["windows"], kw["ranks"]
        assert isinstance(windows, tuple)
        assert isinstance(ranks, tuple)
        scored[k.shape[2]] = (windows, ranks)
        return SimpleNamespace(error=torch.ones(q.shape[0], q.shape[1], len(windows), len(ranks)))

    monkeypatch.setattr(planner_mod._backends, "hybrid_prediction", fake_prediction)
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", sample_size=16)
    assert cfg.hybrid_windows == (64, 128, 256, 512, 1024, 2048)
    assert cfg.hybrid_ranks == (16, 32, 64, 128, 256)
    gen = torch.Generator().manual_seed(12)
    for seq in (1024, 8192):
        q, k, v = (torch.randn(1, 1, seq, 16, generator=gen) for _ in range(3))
        plan = Planner(cfg).plan(prepare(q, k, v, None, True, None, False))
        assert plan.is_exact  # every candidate predicted 1.0: nothing measured, all exact
    # 1024 causal keys: a query reads 512 on average, so windows >= 512 cost as much as exact.
    assert scored[1024] == ((64, 128, 256), (16, 32, 64, 128, 256))
    assert scored[8192] == ((64, 128, 256, 512, 1024, 2048), (16, 32, 64, 128, 256))


def test_error_confidence_plans_on_upper_bounds(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """With ``error_confidence`` each measured error is an upper bound: no smaller than the point
    estimate of the same rows, named as a bound in the reason, never cheaper overall."""
    problem = prepare(*qkv, None, True, None, False)
    base = dict(policy="quality", min_seq_len=128, sample_size=96)
    point = Planner(AdaAttnConfig.adaptive(0.05, **base)).plan(problem)
    bound = Planner(AdaAttnConfig.adaptive(0.05, error_confidence=0.95, **base)).plan(problem)
    assert bound.cost >= point.cost
    assert any(h.mode == "hybrid" for h in bound.heads)  # the synthetic heads still qualify
    for p, b in zip(point.heads, bound.heads, strict=True):
        if b.mode == "hybrid":
            assert "(upper 95% bound)" in b.reason
            if (p.mode, p.window, p.rank) == (b.mode, b.window, b.rank):
                assert b.estimated_error > p.estimated_error
        assert "bound" not in p.reason
    with pytest.raises(ValueError, match="error_confidence must be None or a level"):
        AdaAttnConfig.adaptive(0.05, error_confidence=1.5)


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"margin": 1}, "margin=1"),
        ({"pow2_scales": True}, "pow2_scales=True"),
        ({"smooth_k": False}, "smooth_k=False"),
        ({"block_size": 8192}, "block_size=8192 (> 4096)"),
    ],
)
def test_fp8_recipe_the_kernel_cannot_honour_falls_back_with_a_reason(
    qkv: tuple[torch.Tensor, ...], recipe: dict[str, object], named: str
) -> None:
    """An FP8 recipe option the kernel does not implement is never silently dropped: FP8 is
    skipped for the call and every head's reason names the option."""
    from adaattn_precision import FP8Config, PrecisionPolicy

    balanced = PrecisionPolicy.preset("balanced")
    fp8 = FP8Config(**{**balanced.fp8.to_dict(), **recipe})  # type: ignore[arg-type]
    policy = balanced.replace(name="custom", fp8=fp8)
    cfg = AdaAttnConfig.adaptive(0.05, policy=policy, min_seq_len=0, sample_size=32)
    problem = prepare(*(t[:, :, :256] for t in qkv), None, True, None, False)
    plan = Planner(cfg).plan(problem)
    assert not any(h.mode == "fp8" for h in plan.heads)
    for h in plan.heads:
        assert f"fp8 skipped: policy 'custom''s FP8 recipe asks {named}" in h.reason
