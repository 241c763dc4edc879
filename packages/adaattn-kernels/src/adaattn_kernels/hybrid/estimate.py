r"""Per-head error of a hybrid plan: a sampled measurement and a cheap predictor.

Both work on ``m`` query rows drawn by *stratified* sampling (one uniform row in each of ``m``
equal strata of the query axis), which keeps early causal rows (no far field, no error) and late
rows (most far field) in proportion.

* :func:`estimate_hybrid_error` measures the plan's error on the sampled rows against exact
  attention for those rows, ``O(m · Sk · D)`` per head: the relative Frobenius error
  ``‖Õ_S − O_S‖ / ‖O_S‖`` over the sampled rows ``S``, a ratio estimator of the full-matrix
  ``‖Õ − O‖ / ‖O‖``.
* :func:`predict_hybrid_error` scores a whole grid of ``(w, r)`` candidates after one pass. It
  rests on an identity of the segment-mean construction: the hybrid output of row ``i`` is
  exactly attention with the *implied distribution*

  .. math::

      \tilde p_{ij} \propto
      \begin{cases} e^{s_{ij}} & j \text{ exact (sink or window)} \\
                    e^{\bar s_{it}} & j \in t,\ t \text{ a pooled segment},\ \bar s_{it} =
                    \tfrac1{n_t}\textstyle\sum_{j \in t} s_{ij} \end{cases}

  (``n_t e^{\bar s} \bar v_t = \sum_{j\in t} e^{\bar s} v_j``), so ``Õ_i − O_i =
  Σ_j (p̃_ij − p_ij)(v_j − v̄)``. The predictor keeps only scores: with ``δ = p̃ − p``
  (from per-segment sums: ``O(m · Sk)`` once per rank, ``O(m · r)`` per window, no ``D``
  factor) and a value-spread model in which
  ``v_j − v̄`` are uncorrelated with ``δ``, ``E‖Õ_i − O_i‖² ≈ ‖δ_i‖² · σ_v²`` with
  ``σ_v² = mean_j ‖v_j − v̄‖²``. ``δ`` vanishes when scores are flat within each far segment —
  ``1 − Σ_j min(p_j, p̃_j)`` is the within-segment score-variance effect
  (``log mean e^{s} − mean s ≈ ½ Var(s)``), weighted by far-field mass; the returned
  :class:`HybridErrorPrediction` also reports the attention entropy and far-field mass.

References: Scatterbrain (Chen et al., NeurIPS 2021) for entropy as the low-rank criterion;
the ratio and stratified estimators are standard survey sampling (Cochran, *Sampling
Techniques*, 1977, §5 and §6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaattn_kernels._ratio import check_confidence, relative_error_from_rows
from adaattn_kernels._validation import (
    CAUSAL_NONE,
    CausalArg,
    causal_offset,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.hybrid.naive import (
    _bounds_of,
    _check_plan,
    _expand_kv,
    _hybrid_rows,
    _row_bounds,
    _RowBounds,
)
from adaattn_kernels.hybrid.plan import HybridPlan, segment_size_for_rank

__all__ = [
    "HybridErrorPrediction",
    "estimate_hybrid_error",
    "exact_attention_rows",
    "predict_hybrid_error",
    "sample_query_rows",
]


def sample_query_rows(
    seq_q: int,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stratified sample of query rows: one uniform row in each of ``num_samples`` strata.

    Args:
        seq_q: Number of query rows ``Sq ≥ 1``.
        num_samples: Rows to draw ``m ≥ 1``; all rows are returned when ``m ≥ Sq``.
        generator: CPU random generator (``torch.Generator()``) for reproducible draws.
        device: Device of the returned index tensor.

    Returns:
        Sorted int64 row indices, ``min(m, Sq)`` of them, distinct.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if seq_q < 1:
        raise ValueError(f"seq_q must be >= 1, got {seq_q}")
    if num_samples >= seq_q:
        return torch.arange(seq_q, device=device)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    # Stratum i is [ceil(i·Sq/m), ceil((i+1)·Sq/m)), in integer arithmetic: a float product
    # such as 22 · (122/44) = 61.000000000000007 would move an edge by one row.
    i = torch.arange(num_samples + 1, dtype=torch.int64)
    edges = (i * seq_q + num_samples - 1) // num_samples
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    rows = (lo + (u * width).floor().long()).clamp_max(seq_q - 1)
    return rows.to(device)


def exact_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention output for the query ``rows`` only, float32 (float64 for float64 input).

    ``O(len(rows) · Sk · D)`` per head; GQA as in :func:`adaattn_kernels.attention`.

    Returns:
        ``(B, Hq, len(rows), D)``; rows with no allowed key are 0.
    """
    shape = check_attention_inputs(q, k, v)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    return _exact_rows(q[:, :, rows], rows, k, v, mode, s, shape.seq_q)[0]


def _exact_scores(
    q_rows: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, mode: int, scale: float, seq_q: int
) -> torch.Tensor:
    acc = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    kq = _expand_kv(k, q_rows.shape[1]).to(acc)
    s = torch.matmul(q_rows.to(acc), kq.transpose(-1, -2)) * scale
    if mode != CAUSAL_NONE:
        j = torch.arange(k.shape[2], device=q_rows.device)
        allowed = j[None, :] <= rows[:, None] + causal_offset(mode, seq_q, k.shape[2])
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def _exact_rows(
    q_rows: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: int,
    scale: float,
    seq_q: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    s = _exact_scores(q_rows, rows, k, mode, scale, seq_q)
    p = _softmax_rows(s)
    out = torch.matmul(p, _expand_kv(v, q_rows.shape[1]).to(p.dtype))
    return out, s


def _check_samples(num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")


def _check_finite(**tensors: torch.Tensor) -> None:
    finite = [torch.isfinite(t).all() for t in tensors.values()]
    if bool(torch.stack(finite).all()):  # one host synchronisation for all of them
        return
    name = next(n for n, ok in zip(tensors, finite, strict=True) if not bool(ok))
    raise ValueError(f"`{name}` contains NaN or Inf; the error estimate would be NaN")


def estimate_hybrid_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
    num_samples: int = 256,
    generator: torch.Generator | None = None,
    confidence: float | None = None,
) -> torch.Tensor:
    """Relative error of ``plan`` per (batch, head), measured on sampled query rows.

    Draws ``m = num_samples`` stratified query rows (:func:`sample_query_rows`), computes exact
    attention and the plan's hybrid attention (the reference, float32) for those rows only, and
    returns ``‖Õ_S − O_S‖_F / ‖O_S‖_F`` per head — the ratio estimator of the full relative error
    ``‖Õ − O‖_F / ‖O‖_F``. Cost ``O(m · Sk · D)`` per head, memory ``O(m · Sk)``.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)``.
        plan: The plan to measure, ``(B, Hq)``.
        causal: Causal convention, as in :func:`~adaattn_kernels.hybrid.hybrid_attention`.
        scale: Score scale, default ``1/sqrt(D)``.
        num_samples: Sampled query rows ``m`` (all rows when ``m ≥ Sq``). On real heads the
            error is concentrated in few rows (on SmolLM2, the top 1% of rows can hold over
            90% of the squared error), so small ``m`` tends to *under*-estimate; the default
            256 is what ``tools/hybrid_error_study.py`` validates.
        generator: CPU generator for reproducible sampling.
        confidence: If given (e.g. 0.95), return the one-sided upper confidence bound of the
            ratio estimator at that level instead of the point estimate (delta method, see
            ``adaattn_kernels._ratio.relative_error_from_rows``); no effect when every row is
            measured.

    Returns:
        ``(B, Hq)`` float32 relative errors on ``q``'s device; 0 for exact heads.

    Raises:
        ValueError: Bad shapes, plan, ``num_samples``, or NaN/Inf inputs.
        TypeError: Non-tensor inputs, unsupported dtypes, ``plan`` not a ``HybridPlan``.
    """
    shape = check_attention_inputs(q, k, v)
    _check_plan(plan, shape.batch, shape.heads_q)
    _check_samples(num_samples)
    check_confidence(confidence)
    _check_finite(q=q, k=k, v=v)
    mode = normalize_causal(causal)
    s = resolve_scale(scale, shape.head_dim)
    plan = plan.to(q.device)
    rows = sample_query_rows(shape.seq_q, num_samples, generator=generator, device=q.device)
    q_rows = q[:, :, rows]
    exact, _ = _exact_rows(q_rows, rows, k, v, mode, s, shape.seq_q)
    hybrid, _ = _hybrid_rows(q_rows, rows, k, v, plan, mode, s, shape.seq_q)
    num = (hybrid.double() - exact.double()).square().sum(dim=-1)  # (B, H, m)
    den = exact.double().square().sum(dim=-1)
    err = relative_error_from_rows(
        num, den, confidence=confidence, complete=len(rows) >= shape.seq_q
    )
    return torch.where(plan.is_exact, torch.zeros_like(err), err).float()


@dataclass(frozen=True)
class HybridErrorPrediction:
    """Output of :func:`predict_hybrid_error`.

    Attributes:
        error: ``(B, H, len(windows), len(ranks))`` predicted relative error of each candidate.
        windows: The candidate windows, in order.
        ranks: The candidate ranks, in order.
        far_mass: ``(B, H, len(windows), len(ranks))`` mean true attention mass on pooled keys.
        entropy: ``(B, H)`` mean attention entropy of the sampled rows, normalised by
            ``log(number of allowed keys)`` (1 = uniform, 0 = one key).
    """

    error: torch.Tensor
    windows: tuple[int, ...]
    ranks: tuple[int, ...]
    far_mass: torch.Tensor
    entropy: torch.Tensor

    def best(self, budget: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cheapest candidate per head with predicted error ``≤ budget``.

        Cost is taken as ``w + Sk/g`` ∝ ``w + r``. Returns ``(ok, window, rank)`` ``(B, H)``
        tensors; ``ok`` is False where no candidate meets the budget (keep the head exact).
        """
        w = torch.tensor(self.windows, device=self.error.device)[:, None]
        r = torch.tensor(self.ranks, device=self.error.device)[None, :]
        cost = (w + r).to(self.error.dtype).expand(self.error.shape[-2:])
        cost = torch.where(self.error <= budget, cost, torch.full_like(cost, float("inf")))
        flat = cost.flatten(-2)
        idx = flat.argmin(dim=-1)
        ok = torch.isfinite(flat.gather(-1, idx[..., None]).squeeze(-1))
        wi, ri = idx // len(self.ranks), idx % len(self.ranks)
        return ok, w.squeeze(1)[wi], r.squeeze(0)[ri]


def _implied_weights(
    p: torch.Tensor, s: torch.Tensor, plan: HybridPlan, rows: torch.Tensor, seq_q: int, mode: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implied hybrid distribution ``p̃`` over keys and the pooled-key mask, per sampled row.

    ``p``/``s``: true probabilities and scores ``(B, H, m, Sk)`` (float64); masked scores -inf.
    The plain definition, one plan at a time: the reference :func:`_grid_deviation` (which
    :func:`predict_hybrid_error` runs) is tested against, not used on the planning path.
    """
    sk = s.shape[-1]
    bounds = _row_bounds(plan, rows, seq_q, sk, mode)
    j = torch.arange(sk, device=s.device)
    g = bounds.seg[..., None]  # (B, H, 1, 1)
    t = j // g  # (B, H, 1, Sk) segment of each key
    pooled = ((t >= bounds.left_lo[..., None]) & (t < bounds.left_hi[..., None])) | (
        (t >= bounds.right_lo[..., None]) & (t < bounds.nseg[..., None])
    )
    pooled = pooled & (plan.segment > 0).to(s.device)[..., None, None]
    # Segment means of the scores: pooled segments are fully allowed, so finite.
    finite = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    b, h, m, _ = s.shape
    nseg = int(bounds.nseg.max())
    idx = t.expand(b, h, m, sk)
    seg_sum = torch.zeros(b, h, m, nseg, dtype=s.dtype, device=s.device).scatter_add_(
        3, idx, finite
    )
    seg_cnt = torch.zeros(b, h, 1, nseg, dtype=s.dtype, device=s.device).scatter_add_(
        3, t, torch.ones_like(t, dtype=s.dtype)
    )
    seg_mean = seg_sum / seg_cnt.clamp_min(1)
    s_tilde = torch.where(pooled, torch.gather(seg_mean, 3, idx), s)
    return _softmax_rows(s_tilde), pooled


def _segment_sums(x: torch.Tensor, g: int, nseg: int) -> torch.Tensor:
    """Sums of ``x (..., Sk)`` over key segments of size ``g``: ``(..., nseg)``."""
    pad = nseg * g - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (nseg, g)).sum(-1)


# Elements of the (B, H, m, windows, segments) intermediate the predictor holds at a time.
_MAX_GRID_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class _SampledRows:
    """Rank-independent quantities of the sampled rows, ``(B, H, m, ·)`` float64."""

    p: torch.Tensor  # true probabilities (B, H, m, Sk)
    scores: torch.Tensor  # scores with masked entries 0
    allowed: torch.Tensor  # 1.0 where a key is allowed, else 0.0
    log_z: torch.Tensor  # (B, H, m, 1) log partition function (0 for rows with no key)
    p_sq: torch.Tensor  # p², (B, H, m, Sk)

    @classmethod
    def of(cls, p: torch.Tensor, s: torch.Tensor) -> _SampledRows:
        finite = torch.isfinite(s)
        log_z = torch.logsumexp(s, dim=-1, keepdim=True)
        return cls(
            p=p,
            scores=torch.where(finite, s, torch.zeros_like(s)),
            allowed=finite.to(s.dtype),
            log_z=torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z)),
            p_sq=p.square(),
        )


def _grid_deviation(
    rows: _SampledRows, bounds: _RowBounds, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``‖p̃ − p‖²`` and pooled mass per sampled row for every window of one segment size.

    ``rows``: the sampled rows' probabilities and scores (float64); ``bounds``:
    :func:`_bounds_of` with the ``W`` candidate windows as its "heads", fields ``(1, W, m)``.
    Returns two ``(B, H, m, W)`` tensors. Same quantity as :func:`_implied_weights`, but the
    ``O(m · Sk)`` work is done once per segment size and each window costs ``O(m · Sk / g)``:
    pooled keys are whole segments, so everything reduces to
    per-segment sums. With ``p̄_t = e^{s̄_t − log Z}`` (``s̄_t`` the mean score of segment ``t``,
    ``n_t`` keys, mean probability ``μ_t``, spread ``V_t = Σ_{j∈t} (p_j − μ_t)²``), the implied
    distribution is ``c·p`` on exact keys and ``c·p̄_t`` on pooled ones, ``1/c = E + Σ n_t p̄_t``
    with ``E`` the exact keys' true mass, and

    .. math::
        ‖p̃ − p‖² = (c − 1)² Σ_{exact} p_j² + Σ_{t\ pooled} n_t (c p̄_t − μ_t)² + V_t .

    Each term is non-negative and none is a difference of large intermediate sums (as
    ``Σ p̃² − 2 Σ p̃ p + Σ p²`` or prefix-sum differences would be): ``c − 1`` is formed as
    ``−c Σ_{pooled} n_t (p̄_t − μ_t)`` and ``c p̄_t − μ_t`` as ``(p̄_t − μ_t) + (c − 1) p̄_t``,
    whose two parts are of the size of the result. So the grid agrees with the per-candidate
    evaluation to rounding both when the plan is nearly exact (``c ≈ 1``) and when the window
    misses the row's peak (``c ≫ 1``; the exact part is formed as ``((c − 1)·√Σ p²)²``, which
    stays finite since ``c·E ≤ 1``). Beyond logit gaps of about 700 within a row, where every
    pooled ``p̄_t`` underflows float64, the prediction stays large but is no longer the exact
    value.
    """
    p = rows.p
    sk = p.shape[-1]
    nseg = -(-sk // g)
    # Per-segment statistics, (B, H, m, nseg). Pooled segments are fully allowed.
    n = _segment_sums(rows.allowed, g, nseg)
    s_bar = torch.where(n > 0, _segment_sums(rows.scores, g, nseg) / n.clamp_min(1), -math.inf)
    p_bar = torch.exp(s_bar - rows.log_z)
    mass = _segment_sums(p, g, nseg)
    mu = mass / n.clamp_min(1)
    spread = _segment_sums((p - mu.repeat_interleave(g, dim=-1)[..., :sk]).square(), g, nseg)
    p_sq = _segment_sums(rows.p_sq, g, nseg)
    gap = p_bar - mu
    # Pooled-segment masks of every (window, row): (W, m, nseg) -> broadcast as (m, W, nseg).
    t = torch.arange(nseg, device=p.device)
    left_lo, left_hi = bounds.left_lo[0, ..., None], bounds.left_hi[0, ..., None]
    right_lo = bounds.right_lo[0, ..., None]
    pooled = ((t >= left_lo) & (t < left_hi)) | (t >= right_lo)
    pooled = pooled.expand(-1, int(p.shape[2]), -1).transpose(0, 1).to(p.dtype)
    masks = torch.cat([pooled, 1.0 - pooled], dim=1)  # (m, 2W, nseg): pooled, then exact
    # Masked segment sums of five statistics in one batched matmul, batched over the sampled
    # rows (masks (m, nseg, 2W) are not broadcast, so not copied): (5, B, H, m, 2W).
    stats = torch.stack([mass, n * p_bar, n * gap, p_sq, spread])  # (5, B, H, m, nseg)
    lead = stats.shape[:3]
    flat = stats.permute(3, 0, 1, 2, 4).reshape(stats.shape[3], -1, nseg)
    sums = torch.bmm(flat, masks.transpose(1, 2)).unflatten(1, lead).permute(1, 2, 3, 0, 4)
    w = pooled.shape[1]
    far_mass, exact_mass = sums[0, ..., :w], sums[0, ..., w:]
    inv_c = exact_mass + sums[1, ..., :w]
    c = 1.0 / inv_c.clamp_min(torch.finfo(p.dtype).tiny)
    c_minus_1 = -c * sums[2, ..., :w]
    # Σ_pooled n_t (c p̄_t − μ_t)², in window chunks of at most _MAX_GRID_ELEMENTS elements.
    step = max(1, _MAX_GRID_ELEMENTS // max(1, gap.numel()))
    parts = []
    for i in range(0, pooled.shape[1], step):
        cm1 = c_minus_1[..., i : i + step, None]  # (B, H, m, w, 1)
        dev = n[..., None, :] * (gap[..., None, :] + cm1 * p_bar[..., None, :]).square()
        parts.append((pooled[:, i : i + step] * dev).sum(-1))
    pooled_part = torch.cat(parts, dim=-1) + sums[4, ..., :w]
    delta2 = (c_minus_1 * sums[3, ..., w:].sqrt()).square() + pooled_part
    return delta2, far_mass


def predict_hybrid_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    windows: Sequence[int],
    ranks: Sequence[int],
    sinks: int = 0,
    causal: CausalArg = False,
    scale: float | None = None,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> HybridErrorPrediction:
    """Predict the relative error of hybrid(``w``, ``sinks``, ``r``) for a grid of candidates.

    One ``O(m · Sk · D)`` pass computes the sampled rows' scores; each rank then costs
    ``O(m · Sk)`` and each (window, rank) ``O(m · r)`` (no head-dim factor, a fixed number of
    tensor ops per rank and no host synchronisation per candidate): the implied-distribution
    deviation ``δ = p̃ − p`` (module docstring) gives
    ``error ≈ sqrt(Σ_i ‖δ_i‖²) · σ_v / sqrt(Σ_i ‖O_i‖²)``. Use it to shortlist ``(w, r)`` per
    head, then confirm the pick with :func:`estimate_hybrid_error`.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)`` (only their spread ``σ_v`` and the sampled outputs' norms
            are used).
        windows: Candidate window sizes ``w ≥ 1``.
        ranks: Candidate ranks ``r ≥ 1`` (segment size ``ceil(Sk / r)``).
        sinks: Sink keys kept exact in every candidate.
        causal: Causal convention, as in :func:`~adaattn_kernels.hybrid.hybrid_attention`.
        scale: Score scale, default ``1/sqrt(D)``.
        num_samples: Sampled query rows ``m``.
        generator: CPU generator for reproducible sampling.

    Returns:
        A :class:`HybridErrorPrediction` (float32 tensors on ``q``'s device).

    Raises:
        ValueError: Bad shapes, empty/invalid candidate lists, ``num_samples``, NaN/Inf inputs.
        TypeError: Non-tensor inputs or unsupported dtypes.
    """
    shape = check_attention_inputs(q, k, v)
    _check_samples(num_samples)
    windows, ranks = tuple(windows), tuple(ranks)
    if not windows or not ranks:
        raise ValueError("windows and ranks must each list at least one candidate")
    for name, vals in (("windows", windows), ("ranks", ranks)):
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"every entry of {name} must be an int >= 1, got {x!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    _check_finite(q=q, k=k, v=v)
    mode = normalize_causal(causal)
    sc = resolve_scale(scale, shape.head_dim)
    b, hq, sq, sk = shape.batch, shape.heads_q, shape.seq_q, shape.seq_k
    rows = sample_query_rows(sq, num_samples, generator=generator, device=q.device)
    q_rows = q[:, :, rows].double()
    s = _exact_scores(q_rows, rows, k.double(), mode, sc, sq)
    p = _softmax_rows(s)
    vq = _expand_kv(v, hq).double()
    out_sq = torch.matmul(p, vq).square().sum(dim=(-1, -2)).clamp_min(1e-300)  # Σ_i ‖O_i‖²
    sigma_v2 = (vq - vq.mean(dim=2, keepdim=True)).square().sum(-1).mean(-1)  # (B, H)
    n_allowed = torch.isfinite(s).sum(-1).clamp_min(2).double()
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1) / torch.log(n_allowed)
    err = torch.empty(b, hq, len(windows), len(ranks), dtype=torch.float64, device=q.device)
    far = torch.empty_like(err)
    # All windows of one rank at once: the bounds' "heads" are the windows.
    window_t = torch.tensor([windows], dtype=torch.int64, device=q.device)
    sinks_t = torch.full((1, 1), sinks, dtype=torch.int64, device=q.device)
    sampled = _SampledRows.of(p, s)
    for c, r in enumerate(ranks):
        g = segment_size_for_rank(sk, r)
        segment = torch.full((1, 1), g, dtype=torch.int64, device=q.device)
        bounds = _bounds_of(window_t, sinks_t, segment, rows, sq, sk, mode)
        delta2, far_rows = _grid_deviation(sampled, bounds, g)
        err[..., c] = (delta2.sum(2) * sigma_v2[..., None] / out_sq[..., None]).sqrt()
        far[..., c] = far_rows.mean(2)
    return HybridErrorPrediction(
        error=err.float(),
        windows=windows,
        ranks=ranks,
        far_mass=far.float(),
        entropy=ent.mean(-1).float(),
    )
