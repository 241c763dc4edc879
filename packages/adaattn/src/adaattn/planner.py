"""The planner: per layer and head, the cheapest plan whose measured error meets the budget.

For each call it plans (or reuses a cached plan, see :attr:`AdaAttnConfig.replan`), the planner
measures every query head of the layer from a sample of ``m = sample_size`` query rows:

1. **Entropy** of the sampled attention rows, normalised to ``[0, 1]``
   (``adaattn_linalg.sampled_entropy``; Shannon entropy over ``log n`` attended keys). It is
   recorded in the plan: diffuse (high-entropy) heads are those whose far field pools well
   (Scatterbrain, Chen et al. 2021, §3), peaked local heads those a window captures.
2. **Precision**: ``adaattn_precision.tensor_stats`` of Q, K, V feed the precision package's error
   model (``predict_attention_error``) for the policy's FP8 recipe, and the FP8 kernel's own
   simulation is run on the sampled rows (``adaattn_kernels.fp8.fp8_attention_error``): the
   *measured* relative error ``‖O_fp8 − O‖_F / ‖O‖_F`` on those rows is the estimate used.
3. **Rank**: the hybrid kernels' predictor (``predict_hybrid_error``) scores every
   ``(window, rank)`` of :attr:`AdaAttnConfig.hybrid_windows` × :attr:`~AdaAttnConfig.hybrid_ranks`
   that is cheaper than exact, from the scores of
   :attr:`~AdaAttnConfig.predict_samples` sampled rows; the cheapest predicted to meet the
   tolerance is then measured with ``estimate_hybrid_error`` (the plan run on ``m`` sampled rows
   against exact attention). The predictor tends to under-estimate errors concentrated in a few
   rows, so a head whose measurement misses gets up to two more candidates, each predicted within
   ``tol / ρ`` with ``ρ`` the largest measured/predicted ratio of its misses so far (the
   predictor calibrated on that head).

Each head then gets the cheapest candidate whose *measured* error on the sampled rows is at most
the tolerance, by the cost model below (exact = 1), and falls back to exact otherwise. The
sampled error is a ratio estimator of the full ``‖Õ − O‖_F / ‖O‖_F`` (Cochran 1977, §6); its
sampling error shrinks as ``1/√m``, so raise ``sample_size`` for tight budgets. With ``B > 1``
a head's error is the maximum over (up to four of) the batch entries.

Cost model, relative to exact attention of the same head: FP8 ``≈ 0.58`` (FP8 vs bf16 dense
matmul throughput measured on an H100: 723 / 1249 TFLOP/s, ``shared/ANCHORS.md``); hybrid
``(E + (n̄ − E)/g + Sk/Sq) / n̄``, with ``n̄`` the mean number of keys a query attends,
``g = ⌈Sk/r⌉`` the segment size and ``E = g⌈s/g⌉ + w + (g − 1)·(1 causal, 2 otherwise)`` the keys
read exactly once sinks and window are rounded to segment boundaries as the kernel does: keys read
per query (exact part, pooled segments, the pooling pass) over those of exact attention.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from adaattn import _backends
from adaattn._sdpa import Problem
from adaattn.config import AdaAttnConfig

__all__ = ["COST_FP8", "AttentionPlan", "HeadPlan", "Planner", "PlannerStats", "execute_plan"]

#: Cost of an FP8 head relative to an exact one (H100 bf16/FP8 matmul throughput ratio).
COST_FP8: float = 723.0 / 1249.0
#: Largest number of batch entries measured when planning.
_PLAN_BATCH = 4
#: Sink keys every hybrid candidate keeps exact (StreamingLLM, Xiao et al. 2024: 4 sinks).
_HYBRID_SINKS = 4
#: Hybrid candidates measured per head at most (each after the predictor's shortlist).
_HYBRID_TRIES = 3
# Prepared executables kept per cached plan (oldest dropped first): bounded, so that decoding,
# whose key length changes every call, cannot grow it without limit.
_PREPARED_CACHE_SIZE = 8
_NONFINITE = "inputs hold NaN or Inf; exact attention propagates them (not cached)"
_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


@dataclass(frozen=True)
class HeadPlan:
    """What one query head does, and why.

    Attributes:
        head: Query head index.
        mode: ``"exact"``, ``"fp8"`` or ``"hybrid"``.
        precision: Precision of the head's matmuls: the input dtype (``"bf16"``, ``"fp32"``,
            ...) or, for ``"fp8"`` heads, ``"int8/fp8_e4m3"`` (``Q·Kᵀ`` in int8 with per-block
            scales, ``P·V`` in FP8 e4m3: the 8-bit attention kernel's formats).
        window: Local window of a hybrid head (keys attended exactly around the diagonal).
        rank: Far-field rank of a hybrid head (number of pooled key segments).
        sinks: Leading keys a hybrid head attends exactly.
        estimated_error: Measured relative output error on the sampled rows (0 for exact).
        cost: Estimated cost relative to exact attention of this head.
        entropy: Mean normalised entropy of the sampled attention rows (``None`` if not
            measured).
        reason: Why this plan was chosen, with the candidates' errors.
    """

    head: int
    mode: str
    precision: str
    window: int | None = None
    rank: int | None = None
    sinks: int | None = None
    estimated_error: float = 0.0
    cost: float = 1.0
    entropy: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class AttentionPlan:
    """The plan of one layer for one shape bucket: a :class:`HeadPlan` per query head.

    Attributes:
        layer: Layer index (``None`` for the functional API).
        seq_q: Query length of the call that was measured.
        seq_k: Key length of the call that was measured.
        causal: Whether that call was causal.
        tolerance: Per-head error budget in force.
        policy: Name of the precision policy in force.
        device: Device of the measured tensors.
        heads: One :class:`HeadPlan` per query head.
        call_index: Index of the layer call that made this plan (1-based).
        planning_seconds: Wall time spent measuring and choosing.
        fp8: The FP8 recipe FP8 heads run with (the policy's), ``None`` without FP8 heads.
    """

    layer: int | None
    seq_q: int
    seq_k: int
    causal: bool
    tolerance: float
    policy: str
    device: str
    heads: tuple[HeadPlan, ...]
    call_index: int = 0
    planning_seconds: float = 0.0
    fp8: _backends.FP8Config | None = None

    @property
    def is_exact(self) -> bool:
        """Whether every head is exact."""
        return all(h.mode == "exact" for h in self.heads)

    @property
    def cost(self) -> float:
        """Mean estimated cost over heads, relative to exact attention (1.0 = no saving)."""
        return sum(h.cost for h in self.heads) / max(len(self.heads), 1)

    @property
    def max_error(self) -> float:
        """Largest estimated head error."""
        return max((h.estimated_error for h in self.heads), default=0.0)

    def mode_counts(self) -> dict[str, int]:
        """Number of heads per mode."""
        return dict(Counter(h.mode for h in self.heads))

    def heads_with(self, mode: str) -> list[int]:
        """Indices of the heads planned with ``mode``."""
        return [h.head for h in self.heads if h.mode == mode]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        out = {k: v for k, v in asdict(self).items() if k != "heads"}
        out["heads"] = [h.to_dict() for h in self.heads]
        return out

    def __str__(self) -> str:
        head = (
            f"AttentionPlan(layer={self.layer}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
            f"tolerance={self.tolerance:.3g}, policy={self.policy!r}, cost={self.cost:.3f})"
        )
        lines = [head]
        for h in self.heads:
            detail = f" w={h.window} r={h.rank} s={h.sinks}" if h.mode == "hybrid" else ""
            ent = "-" if h.entropy is None else f"{h.entropy:.3f}"
            lines.append(
                f"  head {h.head:3d}: {h.mode:6s} {h.precision:8s}{detail} "
                f"err {h.estimated_error:.3g} cost {h.cost:.3f} entropy {ent}  {h.reason}"
            )
        return "\n".join(lines)


@dataclass
class PlannerStats:
    """Counters of one planner (one layer).

    Attributes:
        calls: Calls run through the planner.
        plans_made: Plans measured (the rest reused a cached plan).
        planning_seconds: Total time spent planning.
        head_calls: Head executions per mode, summed over calls.
    """

    calls: int = 0
    plans_made: int = 0
    planning_seconds: float = 0.0
    head_calls: dict[str, int] = field(default_factory=dict)

    @property
    def cache_hits(self) -> int:
        """Calls that reused a cached plan."""
        return self.calls - self.plans_made

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {**asdict(self), "cache_hits": self.cache_hits}


@dataclass
class _Entry:
    plan: AttentionPlan
    uses: int = 0
    prepared: dict[tuple[Any, ...], Any] = field(default_factory=dict)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _bucket_key(problem: Problem, policy: Any, tolerance: float) -> tuple[Any, ...]:
    """Cache key of a plan: everything the planner's decision depends on.

    The active policy and tolerance are part of it, so a plan made under ``speed`` is never
    reused inside ``with PrecisionPolicy.preset("quality"):``.
    """
    q = problem.q
    return (
        repr(policy),
        tolerance,
        int(q.shape[1]),
        int(problem.k.shape[1]),
        problem.scale,
        _bucket(problem.seq_q),
        _bucket(problem.seq_k),
        problem.causal,
        problem.mask is not None,
        q.dtype,
        q.device,
    )


def _mean_keys(seq_q: int, seq_k: int, causal: bool) -> float:
    """Mean number of keys a query attends (top-left causal: ``min(i + 1, Sk)``)."""
    if not causal:
        return float(seq_k)
    full = max(seq_q - seq_k, 0)  # rows i >= Sk see every key
    tri = min(seq_q, seq_k)
    return (tri * (tri + 1) / 2 + full * seq_k) / seq_q


def _grad_needed(problem: Problem) -> bool:
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in (problem.q, problem.k, problem.v)
    )


class Planner:
    """Plans and runs one layer's attention; caches plans per shape bucket.

    Args:
        config: The error budget and allowed modes.
        layer_idx: Layer index recorded in the plans.

    Example:
        >>> import torch
        >>> from adaattn import AdaAttnConfig, AdaptiveAttention
        >>> from adaattn.synthetic import structured_qkv
        >>> q, k, v = structured_qkv(("local", "diffuse"), seq_len=512)
        >>> cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=256)
        >>> attn = AdaptiveAttention(cfg)
        >>> _ = attn(q, k, v, is_causal=True)
        >>> attn.plan.heads[0].mode
        'hybrid'
    """

    def __init__(self, config: AdaAttnConfig, *, layer_idx: int | None = None) -> None:
        if not isinstance(config, AdaAttnConfig):
            raise TypeError(f"config must be an AdaAttnConfig, got {type(config).__name__}")
        self.config = config
        self.layer_idx = layer_idx
        self.stats = PlannerStats()
        self.last_plan: AttentionPlan | None = None
        self._cache: dict[tuple[Any, ...], _Entry] = {}

    def clear(self) -> None:
        """Forget every cached plan (statistics are kept)."""
        self._cache.clear()
        self.last_plan = None

    @property
    def cached_plans(self) -> list[AttentionPlan]:
        """The plans currently cached, one per shape bucket."""
        return [e.plan for e in self._cache.values()]

    def run(self, problem: Problem) -> tuple[torch.Tensor, AttentionPlan]:
        """Plan (or reuse the bucket's plan) and execute one call; returns ``(out4, plan)``."""
        self.stats.calls += 1
        key = _bucket_key(problem, self.config.resolved_policy(), self.config.resolved_tolerance())
        entry = self._cache.get(key)
        interval = self.config.replan_interval
        if entry is None or (interval is not None and entry.uses >= interval):
            entry = _Entry(self.plan(problem))
            if not (entry.plan.heads and entry.plan.heads[0].reason == _NONFINITE):
                self._cache[key] = entry  # a NaN/Inf call's plan is not kept for later calls
        entry.uses += 1
        plan = entry.plan
        self.last_plan = plan
        out, modes = execute_plan(problem, plan, cache=entry.prepared)
        for mode, n in Counter(modes).items():
            self.stats.head_calls[mode] = self.stats.head_calls.get(mode, 0) + n
        return out, plan

    # ----------------------------------------------------------------------------- planning
    def plan(self, problem: Problem) -> AttentionPlan:
        """Measure the heads of ``problem`` and choose a plan per head (no caching)."""
        start = time.perf_counter()
        cfg = self.config
        policy = cfg.resolved_policy()
        tol = cfg.resolved_tolerance()
        heads = int(problem.q.shape[1])
        exact_precision = _DTYPE_NAMES.get(problem.q.dtype, str(problem.q.dtype))

        def finish(head_plans: list[HeadPlan]) -> AttentionPlan:
            elapsed = time.perf_counter() - start
            self.stats.plans_made += 1
            self.stats.planning_seconds += elapsed
            return AttentionPlan(
                layer=self.layer_idx,
                seq_q=problem.seq_q,
                seq_k=problem.seq_k,
                causal=problem.causal,
                tolerance=tol,
                policy=policy.name,
                device=str(problem.q.device),
                heads=tuple(head_plans),
                call_index=self.stats.calls,
                planning_seconds=elapsed,
                fp8=policy.fp8 if any(h.mode == "fp8" for h in head_plans) else None,
            )

        def all_exact(reason: str, entropy: list[float | None] | None = None) -> AttentionPlan:
            ent = entropy or [None] * heads
            return finish(
                [
                    HeadPlan(h, "exact", exact_precision, entropy=ent[h], reason=reason)
                    for h in range(heads)
                ]
            )

        if problem.seq_k < cfg.min_seq_len:
            return all_exact(f"key length {problem.seq_k} < min_seq_len {cfg.min_seq_len}")
        if problem.mask is not None:
            return all_exact("an attn_mask is given; the FP8 and hybrid kernels take no mask")
        grad = _grad_needed(problem)
        with torch.no_grad():
            q, k, v = (t[:_PLAN_BATCH].detach() for t in (problem.q, problem.k, problem.v))
            if not bool(torch.stack([torch.isfinite(t).all() for t in (q, k, v)]).all()):
                return all_exact(_NONFINITE)
            return finish(self._measure(problem, q, k, v, policy, tol, exact_precision, grad))

    def _measure(
        self,
        problem: Problem,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        policy: _backends.PrecisionPolicy,
        tol: float,
        exact_precision: str,
        grad: bool,
    ) -> list[HeadPlan]:
        cfg = self.config
        heads, seq_q = int(q.shape[1]), problem.seq_q
        causal, scale = problem.causal, problem.scale
        m = min(cfg.sample_size, seq_q)
        entropy: list[float | None] = [None] * heads
        if m >= 2:
            ent = _backends.sampled_entropy(
                q, k, causal=causal, scale=scale, num_samples=m, seed=cfg.seed
            )
            entropy = [float(x) for x in ent.mean(0).tolist()]
        # candidates[h]: (cost, mode, window, rank, error, note)
        candidates: list[list[tuple[float, str, int | None, int | None, float, str]]] = [
            [] for _ in range(heads)
        ]
        notes: list[list[str]] = [[] for _ in range(heads)]

        fp8_reason = self._fp8_unavailable(problem, policy, grad)
        if fp8_reason is None:
            fp8 = policy.fp8
            model = _backends.fp8_predicted_error(q, k, v, scale=scale, fp8=fp8).amax(0)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            rows = _backends.sample_rows(seq_q, m, gen, q.device)
            measured = _backends.fp8_measured_error(
                q, k, v, rows, causal=causal, scale=scale, fp8=fp8,
                confidence=cfg.error_confidence,
            ).amax(0)  # fmt: skip
            # One transfer for both per-head lists (each float(t[h]) would wait on the device).
            errs, models = torch.stack([measured.double(), model.double()]).tolist()
            where = "simulated" if q.device.type == "cpu" else "kernel"
            for h, (err, predicted) in enumerate(zip(errs, models, strict=True)):
                candidates[h].append(
                    (COST_FP8, "fp8", None, None, err,
                     f"fp8 ({where}) measured {err:.3g}{_bound_label(cfg)} on {len(rows)} rows "
                     f"(e4m3 model {predicted:.3g})")
                )  # fmt: skip
        elif "fp8" in cfg.modes:
            for h in range(heads):
                notes[h].append(f"fp8 skipped: {fp8_reason}")

        if "hybrid" in cfg.modes:
            self._hybrid_candidates(q, k, v, problem, tol, m, candidates, notes)

        plans = []
        for h in range(heads):
            chosen = None
            for cand in sorted(candidates[h], key=lambda c: c[0]):
                if cand[4] <= tol:
                    chosen = cand
                    break
                notes[h].append(f"{cand[5]} > tol {tol:.3g}")
            if chosen is None:
                reason = "; ".join([*notes[h], "exact: no cheaper plan meets the tolerance"])
                plans.append(
                    HeadPlan(h, "exact", exact_precision, entropy=entropy[h], reason=reason)
                )
                continue
            cost, mode, window, rank, err, note = chosen
            reason = "; ".join([*notes[h], f"{note} <= tol {tol:.3g}"])
            plans.append(
                HeadPlan(
                    h,
                    mode,
                    _backends.FP8_PRECISION_LABEL if mode == "fp8" else exact_precision,
                    window=window,
                    rank=rank,
                    sinks=_HYBRID_SINKS if mode == "hybrid" else None,
                    estimated_error=err,
                    cost=cost,
                    entropy=entropy[h],
                    reason=reason,
                )
            )
        return plans

    def _fp8_unavailable(
        self, problem: Problem, policy: _backends.PrecisionPolicy, grad: bool
    ) -> str | None:
        """Why FP8 cannot be a candidate for this call (``None`` if it can)."""
        if "fp8" not in self.config.modes:
            return "not in modes"
        if not policy.allows_fp8:
            return f"policy {policy.name!r} does not allow FP8"
        if policy.fp8.fmt != "e4m3":
            return f"the FP8 kernel is e4m3 only; policy {policy.name!r} asks {policy.fp8.fmt}"
        unsupported = _backends.fp8_recipe_unsupported(policy.fp8)
        if unsupported:
            return (
                f"policy {policy.name!r}'s FP8 recipe asks {unsupported}, which the FP8 attention "
                "kernel does not implement (it scales with margin 0, no power-of-two rounding, "
                "K smoothed by its mean)"
            )
        q = problem.q
        if q.device.type not in ("cuda", "cpu"):
            return f"no FP8 path on {q.device.type} devices"
        allowed = (
            (torch.float16, torch.bfloat16)
            if q.is_cuda
            else (torch.float16, torch.bfloat16, torch.float32)
        )
        if q.dtype not in allowed:
            return f"the FP8 path on {q.device.type} takes {allowed} inputs, not {q.dtype}"
        if grad:
            return "gradients are required and the FP8 path has no backward"
        if q.device.type == "cuda":
            cap = _backends.capability(q.device)
            if not cap.fp8_e4m3:
                if policy.on_fp8_unavailable == "error":
                    raise ValueError(
                        f"policy {policy.name!r} allows FP8 but {cap.name} has no FP8 tensor "
                        "cores (needs sm_89+); use on_fp8_unavailable='fallback' or remove "
                        "'fp8' from AdaAttnConfig.modes"
                    )
                return f"{cap.name} has no FP8 tensor cores"
            from adaattn_kernels.fp8 import FP8_HEAD_DIMS

            if q.shape[-1] not in FP8_HEAD_DIMS:
                return f"head_dim {q.shape[-1]} is not one of the FP8 kernel's {FP8_HEAD_DIMS}"
        return None

    def _hybrid_candidates(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        problem: Problem,
        tol: float,
        m: int,
        candidates: list[list[tuple[float, str, int | None, int | None, float, str]]],
        notes: list[list[str]],
    ) -> None:
        cfg = self.config
        heads, seq_q, seq_k = int(q.shape[1]), problem.seq_q, problem.seq_k
        mean_keys = _mean_keys(seq_q, seq_k, problem.causal)
        pooling = seq_k / seq_q  # the far-field pooling pass, per query

        def cost(w: int, r: int) -> float:
            # Keys read per query by the kernel's decomposition (hybrid/naive.py): sinks rounded
            # up to whole segments, the window widened to segment boundaries (one edge when
            # causal, two otherwise), then one pooled key per segment of what is left.
            g = -(-seq_k // r)
            sinks = min(g * -(-_HYBRID_SINKS // g), seq_k)
            exact = min(sinks + w + (g - 1) * (1 if problem.causal else 2), mean_keys)
            pooled = max(mean_keys - exact, 0.0) / g
            return min(1.0, (exact + pooled + pooling) / mean_keys)

        # Candidates cheaper than exact, cheapest first (ties by window, then rank).
        priced = {(cost(w, r), w, r) for w in cfg.hybrid_windows for r in cfg.hybrid_ranks}
        grid = sorted(cand for cand in priced if cand[0] < 1.0)
        if not grid:
            for h in range(heads):
                notes[h].append(
                    f"hybrid skipped: no (window, rank) is cheaper than {mean_keys:.0f} keys"
                )
            return
        windows = tuple(sorted({w for _, w, _ in grid}))
        ranks = tuple(sorted({r for _, _, r in grid}))
        m_pred = min(m, cfg.predict_samples)
        pred = _backends.hybrid_prediction(
            q, k, v, windows=windows, ranks=ranks, sinks=_HYBRID_SINKS, causal=problem.causal,
            scale=problem.scale, num_samples=m_pred,
            generator=torch.Generator().manual_seed(cfg.seed + 2),
        )  # fmt: skip
        # Selection runs on host lists: one transfer, then no tensor op per head or candidate.
        # (A NaN prediction would make min() below order-dependent: it counts as unbounded.)
        grid_err: list[list[list[float]]] = (
            pred.error.amax(0).nan_to_num(nan=math.inf).tolist()  # [H][W][R]
        )
        cands = [(c, windows.index(w), ranks.index(r)) for c, w, r in grid]
        tried: list[set[tuple[int, int]]] = [set() for _ in range(heads)]
        # Per-head calibration of the predictor: after a measured miss, the head's later picks
        # must be predicted within tol / (measured / predicted) of that miss (never relaxed).
        ratio = [1.0] * heads
        pending = list(range(heads))
        for attempt in range(_HYBRID_TRIES):
            picks: dict[int, tuple[float, int, int]] = {}
            for h in pending:
                e_h = grid_err[h]
                pick = next(
                    (
                        (c, wi, ri)
                        for c, wi, ri in cands
                        if e_h[wi][ri] * ratio[h] <= tol and (wi, ri) not in tried[h]
                    ),
                    None,
                )
                if pick is None:
                    if attempt == 0:
                        _, wb, rb = min((e_h[wi][ri], wi, ri) for _, wi, ri in cands)
                        notes[h].append(
                            f"hybrid: no (window, rank) predicted within tol {tol:.3g} on "
                            f"{m_pred} rows (best w={windows[wb]} r={ranks[rb]} predicted "
                            f"{e_h[wb][rb]:.3g})"
                        )
                    else:
                        notes[h].append(
                            f"hybrid: no untried (window, rank) predicted within tol {tol:.3g} "
                            f"after calibrating the predictor by x{ratio[h]:.2f}"
                        )
                    continue
                picks[h] = pick
                tried[h].add(pick[1:])
            if not picks:
                break
            window, rank, exact = [1] * heads, [1] * heads, [True] * heads
            for h, (_, wi, ri) in picks.items():
                window[h], rank[h], exact[h] = windows[wi], ranks[ri], False
            plan = _backends.hybrid_plan(
                int(q.shape[0]), heads, seq_k=seq_k, window=torch.tensor(window),
                rank=torch.tensor(rank), sinks=_HYBRID_SINKS, exact=torch.tensor(exact),
                device=q.device,
            )  # fmt: skip
            measured: list[float] = _backends.hybrid_measured_error(
                q, k, v, plan, causal=problem.causal, scale=problem.scale, num_samples=m,
                generator=torch.Generator().manual_seed(cfg.seed + 3),
                confidence=self.config.error_confidence,
            ).amax(0).tolist()  # fmt: skip
            pending = []
            for h, (c, wi, ri) in picks.items():
                w, r, e = windows[wi], ranks[ri], measured[h]
                predicted = grid_err[h][wi][ri]
                note = (
                    f"hybrid w={w} r={r} measured {e:.3g}{_bound_label(self.config)} on {m} rows "
                    f"(predicted {predicted:.3g}, cost {c:.3f})"
                )
                candidates[h].append((c, "hybrid", w, r, e, note))
                if e > tol:
                    pending.append(h)
                    if predicted > 0.0:
                        ratio[h] = max(ratio[h], e / predicted)


def _bound_label(cfg: AdaAttnConfig) -> str:
    """`` (upper 95% bound)`` when measured errors are confidence bounds, else empty."""
    c = cfg.error_confidence
    return "" if c is None else f" (upper {100 * c:g}% bound)"


@dataclass
class _Executable:
    """A plan prepared for one (batch, key length, device, grad, mask) setting.

    Index tensors and the hybrid plan are built once, so cached plans run without host work.
    """

    modes: list[str]
    rest: tuple[torch.Tensor, torch.Tensor] | None  # (query heads, kv heads) of non-FP8 heads
    fp8: tuple[torch.Tensor, torch.Tensor] | None  # (query heads, kv heads) of FP8 heads
    all_rest: bool
    hybrid_plan: Any | None
    inverse: torch.Tensor | None


def _selection(
    idx: list[int], heads: int, kv_heads: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-head and key/value-head indices selecting the query heads ``idx``.

    The grouped-query layout is kept when whole groups are selected; otherwise each selected
    query head gets its key/value head gathered.
    """
    g = heads // kv_heads
    groups = sorted({i // g for i in idx})
    if idx == [grp * g + r for grp in groups for r in range(g)]:
        kv = groups
    else:
        kv = [i // g for i in idx]
    return (
        torch.tensor(idx, dtype=torch.long, device=device),
        torch.tensor(kv, dtype=torch.long, device=device),
    )


def _compile(problem: Problem, plan: AttentionPlan, grad: bool) -> _Executable:
    heads, kv_heads = int(problem.q.shape[1]), int(problem.k.shape[1])
    if len(plan.heads) != heads:
        raise ValueError(f"plan has {len(plan.heads)} heads but the call has {heads}")
    modes = [h.mode for h in plan.heads]
    if problem.mask is not None:
        modes = ["exact"] * heads
    elif grad:  # the FP8 path is inference-only
        modes = ["exact" if m == "fp8" else m for m in modes]
    device = problem.q.device
    fp8_idx = [h for h in range(heads) if modes[h] == "fp8"]
    rest_idx = [h for h in range(heads) if modes[h] != "fp8"]
    hybrid_plan = None
    if any(modes[h] == "hybrid" for h in rest_idx):
        hp = [plan.heads[h] for h in rest_idx]
        hybrid_plan = _backends.hybrid_plan(
            int(problem.q.shape[0]),
            len(rest_idx),
            seq_k=problem.seq_k,
            window=torch.tensor([p.window or 1 for p in hp]),
            rank=torch.tensor([p.rank or 1 for p in hp]),
            sinks=max((p.sinks or 0) for p in hp),
            exact=torch.tensor([modes[h] != "hybrid" for h in rest_idx]),
            device=device,
        )
    order = rest_idx + fp8_idx
    inverse = None
    if order != list(range(heads)):
        inverse = torch.argsort(torch.tensor(order)).to(device)
    return _Executable(
        modes=modes,
        rest=_selection(rest_idx, heads, kv_heads, device)
        if rest_idx and len(rest_idx) < heads
        else None,
        fp8=_selection(fp8_idx, heads, kv_heads, device) if fp8_idx else None,
        all_rest=len(rest_idx) == heads,
        hybrid_plan=hybrid_plan,
        inverse=inverse,
    )


def _select(
    problem: Problem, sel: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sel is None:
        return problem.q, problem.k, problem.v
    qi, kvi = sel
    return (
        problem.q.index_select(1, qi),
        problem.k.index_select(1, kvi),
        problem.v.index_select(1, kvi),
    )


def execute_plan(
    problem: Problem,
    plan: AttentionPlan,
    *,
    cache: dict[tuple[Any, ...], Any] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Run ``problem`` under ``plan``; returns the ``(B, H, L, D)`` output and each head's mode.

    Exact and hybrid heads run in one hybrid-kernel launch (exact heads have no far field),
    FP8 heads in one FP8 launch. A cached plan with FP8 heads runs those heads exactly when
    gradients are required (the FP8 path is inference-only), and every head exactly when the
    call has a mask. ``cache`` (a dict kept with the plan) holds the prepared index tensors and
    hybrid plan per (batch, key length, device, grad) so repeated calls do no host work.
    """
    grad = _grad_needed(problem)
    key = (int(problem.q.shape[0]), problem.seq_k, problem.q.device, grad, problem.mask is not None)
    ex = cache.get(key) if cache is not None else None
    if ex is None:
        ex = _compile(problem, plan, grad)
        if cache is not None:
            if len(cache) >= _PREPARED_CACHE_SIZE:  # decoding: a new key length every call
                cache.pop(next(iter(cache)))
            cache[key] = ex
    if all(m == "exact" for m in ex.modes):
        out = _backends.dense_attention(
            problem.q, problem.k, problem.v, attn_mask=problem.mask, causal=problem.causal,
            scale=problem.scale,
        )  # fmt: skip
        return out, ex.modes
    parts = []
    if ex.all_rest or ex.rest is not None:
        q, k, v = _select(problem, ex.rest)
        if ex.hybrid_plan is not None:
            parts.append(
                _backends.hybrid_attention(
                    q, k, v, ex.hybrid_plan, causal=problem.causal, scale=problem.scale
                )
            )
        else:
            parts.append(
                _backends.dense_attention(
                    q, k, v, attn_mask=None, causal=problem.causal, scale=problem.scale
                )
            )
    if ex.fp8 is not None:
        if plan.fp8 is None:
            raise ValueError("plan has FP8 heads but no FP8 recipe (AttentionPlan.fp8)")
        q, k, v = _select(problem, ex.fp8)
        parts.append(
            _backends.fp8_attention(
                q, k, v, causal=problem.causal, scale=problem.scale, fp8=plan.fp8
            )
        )
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if ex.inverse is not None:
        out = out.index_select(1, ex.inverse)
    return out, ex.modes
