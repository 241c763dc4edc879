"""Per-head precision selection from an error model of quantised attention.

Error model
-----------
Attention ``O = softmax(τ Q Kᵀ) V`` (``τ`` = ``scale``) is evaluated with inputs rounded
to a precision ``p`` (for FP8 with the policy's scaling recipe and, if ``smooth_k``, K
replaced by ``K - mean_s K``, which softmax cancels exactly; SageAttention, Zhang et al.
2024, Sec. 3.2). The model predicts the per-head relative Frobenius error
``‖Ô - O‖_F / ‖O‖_F`` from :class:`~adaattn_precision.TensorStats` only.

1. Element rounding. A value in the normal range of a format with ``m`` mantissa bits is
   rounded to nearest with error uniform in ± half an ulp, i.e. at most ``u|x|`` with
   unit roundoff ``u = 2^-(m+1)`` (e4m3: 2⁻⁴, e5m2: 2⁻³, bf16: 2⁻⁸, fp16: 2⁻¹¹). Its
   variance is at most ``ε² x²`` with ``ε² = u²/3`` (the worst mantissa position).
   Values below the smallest normal of the scaled format have absolute error uniform in
   ± half the subnormal step ``δ_sub · scale``, variance ``a² = (δ_sub · scale)²/12``,
   with ``scale ≤ amax · 2^margin' / fp8_max`` (``margin' = margin + 1`` with power-of-two
   scales). Per channel ``d``: ``Var δx_d = ε² E[x_d²] + a²``.
2. Scores. ``δs_ij = τ(δq_i·k_j + q_i·δk_j + δq_i·δk_j)``; with independent rounding
   errors, averaged over query/key pairs,
   ``σ²_δs = τ² Σ_d (Var δq_d E[k_d²] + E[q_d²] Var δk_d + Var δq_d Var δk_d)``.
3. Softmax. To first order ``δO_i = Σ_j P_ij δs_ij (v_j - O_i) + Σ_j P_ij δv_j``, so
   ``E‖δO_i‖² ≈ σ²_δs h_i Σ_d Var v_d + p₂ Σ_d Var δv_d`` with ``p₂ = Σ_j P_ij²`` and
   ``h_i = Σ_j P_ij² w_j (1 - 2P_ij + p₂)``, and
   ``‖O_i‖² ≈ ‖mean_s v‖² + (p₂ - 1/S) Σ_d Var v_d`` (the sample mean is part of O).
   ``p₂`` and ``h`` depend on how peaked softmax is. Scores of a query are modelled as a
   Gaussian scale mixture: variance ``σ_s² r_i ρ_k`` with ``σ_s² = τ² Σ_d E[q_d²] Var k_d``
   and ``r_i``, ``ρ_k`` the query / (smoothed) key token-norm quantiles of
   :class:`~adaattn_precision.TensorStats`. The top 64 key order statistics are sampled
   (16 replicas from a fixed seed, as uniform order statistics ``Γ_j / Γ_{S+1}``) and the
   bulk is placed at expected ranks: in peaked rows the error is set by the random gap
   between the largest scores, which expected order statistics would miss. ``w_j`` is the
   relative rounding variance of key ``j``'s score: high-scoring keys have more energy
   along the query, ``w = (1 - A) ρ(s) + A s²/σ_i²`` for Gaussian keys, where
   ``A = Σ_d c_d² / (Σ_d c_d)²``, ``c_d = E[q_d²] Var k_d``, is the participation of
   channels in the score (≈ 1 with one dominant outlier channel, ≈ 1/D when isotropic).
   With ``causal=True`` the geometry is averaged over four strata of query positions.
4. ``predicted = c · sqrt(E‖δO‖² / E‖O‖²)`` (expectations over query strata) with a
   calibration factor ``c`` (:data:`CALIBRATION`) chosen so that the prediction is not
   below the measured error on a grid of synthetic heads with outlier channels and K
   offsets (``benchmarks/calibrate_error_model.py``; distribution in ``docs/precision``).

The model is conservative by construction in step 1 (worst mantissa position: about 1.4×
the average rounding variance). It does not model rounding of the probabilities ``P``
before ``P V`` (kernels that keep ``P`` in the input precision add an error of the same
form as the V term), and it under-predicts (by up to ~1.8× measured) when single huge
elements rather than channels dominate, e.g. i.i.d. Student-t (ν = 3) entries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .capability import DeviceCapability
from .fp8 import fp8_format_info
from .policy import PRECISIONS, FP8Config, PrecisionPolicy, is_fp8, torch_dtype
from .stats import STRATA_EDGES, TensorStats

__all__ = [
    "CALIBRATION",
    "PrecisionPlan",
    "predict_attention_error",
    "select_precision",
]

#: Multiplier applied to the model's relative error (step 4 of the module docstring).
CALIBRATION: float = 1.15

# (unit roundoff u, absolute subnormal step, is scaled) for the non-FP8 precisions.
_IEEE: dict[str, tuple[float, float]] = {
    "bf16": (2.0**-8, 2.0**-133),
    "fp16": (2.0**-11, 2.0**-24),
    "fp32": (2.0**-24, 2.0**-149),
}
_FP16_MAX = 65504.0
_GRID = 256
_TOP = 64
_BULK = 64
_REPLICAS = 16
_SEED = 20240611
_CAUSAL_STRATA = 4


def _rounding_variance(
    stats: TensorStats, precision: str, fp8: FP8Config, *, centered: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel second moment ``E[x_d²]`` and rounding variance ``Var δx_d``."""
    if centered:
        x2 = stats.channel_var
        amax = stats.centered_amax
    else:
        x2 = stats.channel_ms
        amax = stats.amax
    if is_fp8(precision):
        info = fp8_format_info(precision[4:])
        u = info["unit_roundoff"]
        headroom = 2.0 ** (fp8.margin + (1 if fp8.pow2_scales else 0))
        # The group scale is at most amax * headroom / fp8_max (any granularity).
        group_scale = amax * headroom / info["max"]
        abs_var = (info["subnormal_step"] * group_scale) ** 2 / 12.0
    else:
        u, step = _IEEE[precision]
        abs_var = torch.full_like(amax, step**2 / 12.0)
    eps2 = u * u / 3.0
    return x2, eps2 * x2 + abs_var[..., None]


def predict_attention_error(
    q_stats: TensorStats,
    k_stats: TensorStats,
    v_stats: TensorStats,
    *,
    precision: str,
    scale: float,
    fp8: FP8Config | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Predict the relative attention-output error per (batch, head) for one precision.

    See the module docstring for the model. For ``fp16`` the prediction is ``inf`` where
    any input exceeds the fp16 range (overflow).

    Args:
        q_stats: Statistics of Q, ``(B, H)`` heads.
        k_stats: Statistics of K (heads may be fewer than Q's for grouped-query
            attention; they are repeated to match).
        v_stats: Statistics of V (same heads as K).
        precision: A name from :data:`adaattn_precision.PRECISIONS`.
        scale: Softmax scale ``τ`` (usually ``1/sqrt(D)``); finite and > 0.
        fp8: FP8 recipe (used for FP8 precisions; default :class:`FP8Config`).
        causal: Causal mask (query ``i`` of ``S_q`` sees the first ``S_k - S_q + i + 1``
            keys); the softmax geometry is averaged over four strata of query positions.

    Returns:
        Predicted ``‖Ô - O‖_F / ‖O‖_F`` per (batch, head), float32 or float64, shape
        ``(B, H)`` of ``q_stats``.

    Raises:
        ValueError: On an unknown precision, a bad scale, or mismatched statistics.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    preds = _predict_many(
        q_stats, k_stats, v_stats, (precision,), scale, fp8 or FP8Config(), causal=causal
    )
    return preds[precision]


def _fp8_for(precision: str, fp8: FP8Config) -> FP8Config:
    if is_fp8(precision) and fp8.fmt != precision[4:]:
        return dataclasses.replace(fp8, fmt=precision[4:])  # type: ignore[arg-type]
    return fp8


def _predict_many(
    q_stats: TensorStats,
    k_stats: TensorStats,
    v_stats: TensorStats,
    precisions: tuple[str, ...],
    scale: float,
    fp8: FP8Config,
    causal: bool = False,
) -> dict[str, torch.Tensor]:
    """Predicted errors for several precisions sharing one softmax-geometry computation."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0 (e.g. 1/sqrt(head_dim)), got {scale}")
    k_stats, v_stats = _match_heads(q_stats, k_stats, v_stats)
    tau2 = float(scale) ** 2
    q2 = q_stats.channel_ms
    contrib = q2 * k_stats.channel_var
    var_s = tau2 * contrib.sum(-1)
    align = (contrib**2).sum(-1) / (contrib.sum(-1) ** 2).clamp_min(torch.finfo(q2.dtype).tiny)
    seq = k_stats.seq_len
    dt = torch.float64
    edges = torch.tensor(STRATA_EDGES, dtype=dt, device=var_s.device)
    qmass = edges[1:] - edges[:-1]
    r = q_stats.token_ms_quantiles.to(dt)
    score_weight = torch.zeros_like(var_s, dtype=dt)
    mean_p2 = torch.zeros_like(score_weight)
    key_counts = _key_counts(q_stats.seq_len, seq, causal)
    for n in key_counts:
        p2, hk = _softmax_moments(
            var_s,
            q_stats.token_ms_quantiles,
            k_stats.centered_token_ms_quantiles,
            align,
            n,
        )
        score_weight += (qmass * r * hk).sum(-1) / len(key_counts)
        mean_p2 += (qmass * p2).sum(-1) / len(key_counts)
    v_var = v_stats.channel_var.sum(-1).to(dt)
    v_mean2 = (v_stats.channel_mean**2).sum(-1).to(dt)
    # ‖O_i‖² ≈ ‖mean_s v‖² + (p₂ - 1/S) Σ_d Var v_d: the sample mean is part of O.
    spread = (mean_p2 - 1.0 / seq).clamp_min(0)
    den = (v_mean2 + spread * v_var).clamp_min(torch.finfo(dt).tiny)
    over = (q_stats.amax >= _FP16_MAX) | (k_stats.amax >= _FP16_MAX) | (v_stats.amax >= _FP16_MAX)
    out: dict[str, torch.Tensor] = {}
    for precision in precisions:
        cfg = _fp8_for(precision, fp8)
        smooth = cfg.smooth_k if is_fp8(precision) else False
        _, dq = _rounding_variance(q_stats, precision, cfg, centered=False)
        k2, dk = _rounding_variance(k_stats, precision, cfg, centered=smooth)
        _, dv = _rounding_variance(v_stats, precision, cfg, centered=False)
        var_ds = tau2 * (dq * k2 + q2 * dk + dq * dk).sum(-1)
        num = var_ds.to(dt) * score_weight * v_var + mean_p2 * dv.sum(-1).to(dt)
        err = (CALIBRATION * (num / den).sqrt()).to(q_stats.amax.dtype)
        if precision == "fp16":
            err = torch.where(over, torch.full_like(err, float("inf")), err)
        out[precision] = err
    return out


def _key_counts(seq_q: int, seq_k: int, causal: bool) -> list[int]:
    """Key counts seen by the queries, one entry per query stratum of equal mass.

    Without a mask every query sees ``seq_k`` keys; with a causal mask aligned to the
    bottom right (as in FlashAttention) four strata of query positions are used.
    """
    if not causal:
        return [seq_k]
    first = max(seq_k - seq_q, 0)
    counts = [
        first + max(1, round((c + 0.5) / _CAUSAL_STRATA * min(seq_q, seq_k)))
        for c in range(_CAUSAL_STRATA)
    ]
    return counts


def _match_heads(q: TensorStats, k: TensorStats, v: TensorStats) -> tuple[TensorStats, TensorStats]:
    for name, st in (("q_stats", q), ("k_stats", k), ("v_stats", v)):
        if not isinstance(st, TensorStats):
            raise TypeError(f"{name} must be a TensorStats, got {type(st).__name__}")
    if q.head_dim != k.head_dim:
        raise ValueError(f"q_stats and k_stats head_dim differ: {q.head_dim} vs {k.head_dim}")
    if k.shape != v.shape or k.seq_len != v.seq_len:
        raise ValueError(
            f"k_stats and v_stats must describe the same (B, H) and S, got {k.shape}/{k.seq_len}"
            f" and {v.shape}/{v.seq_len}"
        )
    (bq, hq), (bk, hk) = q.shape, k.shape
    if bq != bk or hq % hk != 0:
        raise ValueError(
            f"q_stats (B, H) = {(bq, hq)} is incompatible with k_stats (B, H) = {(bk, hk)}; "
            "batch must match and Q heads must be a multiple of K/V heads"
        )
    if hq == hk:
        return k, v
    rep = hq // hk
    return _repeat_heads(k, rep), _repeat_heads(v, rep)


def _repeat_heads(st: TensorStats, rep: int) -> TensorStats:
    changes = {
        f.name: getattr(st, f.name).repeat_interleave(rep, dim=1)
        for f in dataclasses.fields(st)
        if isinstance(getattr(st, f.name), torch.Tensor)
    }
    return dataclasses.replace(st, **changes)


def _softmax_moments(
    var_s: torch.Tensor, r: torch.Tensor, rho: torch.Tensor, align: torch.Tensor, seq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concentration of softmax weights under a Gaussian scale-mixture score model.

    For a query in stratum ``i`` (mean-square ratio ``r_i``) the scores over keys are
    modelled as a mixture over key strata ``k`` (mass ``m_k``, ratio ``ρ_k``) of centred
    Gaussians with variance ``var_s · r_i · ρ_k``. ``seq`` keys are placed at the
    expected order statistics of that mixture (all of the top 128 ranks, the bulk on 128
    rank points with multiplicity), which covers both the diffuse regime and the peaked
    one where a few extreme keys dominate.

    Returns:
        ``(p2, hk)`` of shape ``(..., L)``: ``p2_i = Σ_j P_ij²`` and
        ``hk_i = Σ_j P_ij² ρ(s_j) (1 - 2 P_ij + p2_i)`` (``ρ(s)`` = expected key ratio at
        score ``s``), per query stratum.
    """
    dt = torch.float64
    dev = var_s.device
    edges = torch.tensor(STRATA_EDGES, dtype=dt, device=dev)
    mass = edges[1:] - edges[:-1]  # (L,)
    sig = var_s.to(dt)[..., None, None] * r.to(dt)[..., :, None] * rho.to(dt)[..., None, :]
    sig = sig.clamp_min(1e-24).sqrt()  # (..., Lq, Lk)
    smax = 9.0 * sig.amax(dim=-1, keepdim=True)  # (..., Lq, 1)
    grid = torch.linspace(-1.0, 1.0, _GRID, dtype=dt, device=dev) * smax  # (..., Lq, G)
    z = grid[..., :, None] / sig[..., None, :]  # (..., Lq, G, Lk)
    log_mass = mass.log()
    # log survival function and log density of the mixture on the grid
    log_surv = torch.logsumexp(torch.special.log_ndtr(-z) + log_mass, dim=-1)
    log_comp = -0.5 * z * z - sig[..., None, :].log() + log_mass  # up to a constant
    rho_of_s = (torch.softmax(log_comp, dim=-1) * rho.to(dt)[..., None, None, :]).sum(-1)
    # Order statistics. The top ranks are random: survival levels of the top `top` of
    # `seq` uniforms are Γ_j / Γ_{seq+1} (Γ: cumulative sums of Exp(1)), drawn for
    # `_REPLICAS` replicas from a fixed seed; the gaps between the largest scores decide
    # how peaked softmax is. The bulk is placed at expected ranks with multiplicity.
    top = min(seq, _TOP)
    gen = torch.Generator().manual_seed(_SEED)
    expo = torch.empty(_REPLICAS, top + 1, dtype=dt).exponential_(generator=gen)
    gam = expo.cumsum(dim=-1)
    # Γ_{seq+1}: exact when all ranks are drawn, else its expectation given Γ_top
    total = gam[:, -1:] + (seq - top) if seq > top else gam[:, -1:]
    levels = (gam[:, :top] / total).to(dev)  # (R, top)
    weights = torch.ones(top, dtype=dt, device=dev)
    if seq > top:
        bulk = torch.linspace(top, seq, _BULK + 1, dtype=dt, device=dev)
        bulk_levels = ((bulk[1:] + bulk[:-1]) / 2) / seq
        levels = torch.cat([levels, bulk_levels.expand(_REPLICAS, -1)], dim=-1)
        weights = torch.cat(
            [weights, torch.full((_BULK,), (seq - top) / _BULK, dtype=dt, device=dev)]
        )
    xs = (-log_surv).contiguous()  # nondecreasing along the grid, (..., Lq, G)
    n_pts = levels.shape[-1]
    t = levels.clamp(1e-300, 1.0).log().neg().reshape(1, -1)  # (1, R * n_pts)
    t = t.expand(*xs.shape[:-1], -1).contiguous()
    idx = torch.searchsorted(xs, t).clamp(1, _GRID - 1)
    x0, x1 = xs.gather(-1, idx - 1), xs.gather(-1, idx)
    g0, g1 = grid.gather(-1, idx - 1), grid.gather(-1, idx)
    frac = ((t - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    s = (g0 + frac * (g1 - g0)).unflatten(-1, (_REPLICAS, n_pts))
    r0, r1 = rho_of_s.gather(-1, idx - 1), rho_of_s.gather(-1, idx)
    rho_s = (r0 + frac * (r1 - r0)).unflatten(-1, (_REPLICAS, n_pts))
    logw = s + weights.log()
    p = torch.exp(s - torch.logsumexp(logw, dim=-1, keepdim=True))  # weight of one key
    p2r = (weights * p * p).sum(-1)  # (..., Lq, R)
    # Rounding error of a score grows with the key's energy along the query: for Gaussian
    # keys, E[k_d² | s] = ρ K_d + (q_d K_d)² (s² - σ²)/σ⁴, which averages to the factor
    # (1 - A) ρ(s) + A s²/σ_i² with A the participation of channels in the score.
    a = align.to(dt)[..., None, None, None]
    sig_i2 = (var_s.to(dt)[..., None] * r.to(dt)).clamp_min(1e-24)[..., :, None, None]
    wt = (1 - a) * rho_s + a * s * s / sig_i2
    hkr = (weights * p * p * wt * (1 - 2 * p + p2r[..., None])).sum(-1)
    p2 = p2r.mean(-1)
    hk = hkr.mean(-1)
    return p2.clamp(0, 1), hk.clamp_min(0)


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-head precision decisions.

    One decision per query head applies to every batch element: the predicted error of a
    head is the maximum over the batch.

    Attributes:
        precisions: Chosen precision name per head (see :data:`PRECISIONS`).
        predicted_error: Predicted relative output error of the chosen precision per head.
        reasons: Human-readable reason per head.
        fallbacks: ``(head, reason)`` for heads that did not get the precision the policy
            would have chosen on a device with full support.
        candidate_errors: Predicted error per head for every precision evaluated.
        policy: The policy used.
        device: The capability's device string.
    """

    precisions: tuple[str, ...]
    predicted_error: tuple[float, ...]
    reasons: tuple[str, ...]
    fallbacks: tuple[tuple[int, str], ...]
    candidate_errors: dict[str, tuple[float, ...]] = field(hash=False, compare=False)
    policy: PrecisionPolicy
    device: str

    @property
    def num_heads(self) -> int:
        """Number of heads."""
        return len(self.precisions)

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Chosen ``torch.dtype`` per head."""
        return tuple(torch_dtype(p) for p in self.precisions)

    def heads_with(self, precision: str) -> list[int]:
        """Indices of heads assigned ``precision``."""
        return [h for h, p in enumerate(self.precisions) if p == precision]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "precisions": list(self.precisions),
            "predicted_error": list(self.predicted_error),
            "reasons": list(self.reasons),
            "fallbacks": [list(f) for f in self.fallbacks],
            "candidate_errors": {k: list(v) for k, v in self.candidate_errors.items()},
            "policy": self.policy.to_dict(),
            "device": self.device,
        }

    def __str__(self) -> str:
        lines = [f"PrecisionPlan(policy={self.policy.name!r}, device={self.device!r})"]
        for h, (p, e, r) in enumerate(zip(self.precisions, self.predicted_error, self.reasons)):
            lines.append(f"  head {h:3d}: {p:9s} pred.err {e:.3g}  {r}")
        return "\n".join(lines)


def _fallback_precision(capability: DeviceCapability, fp16_ok: bool) -> str:
    if capability.bf16:
        return "bf16"
    if capability.fp16 and fp16_ok:
        return "fp16"
    return "fp32"


def select_precision(
    q_stats: TensorStats,
    k_stats: TensorStats,
    v_stats: TensorStats,
    policy: PrecisionPolicy | None,
    capability: DeviceCapability,
    *,
    scale: float,
    causal: bool = False,
) -> PrecisionPlan:
    """Choose a precision per head: the cheapest allowed one predicted within tolerance.

    For each head the allowed precisions are tried from cheapest (FP8) to most precise
    (fp32); precisions the device does not run natively are skipped. The first whose
    predicted error (:func:`predict_attention_error`, maximum over the batch) is at most
    ``policy.tolerance`` is chosen; if none is, the most precise usable one is chosen and
    the reason says so.

    FP8 on a device without FP8 tensor cores: with ``policy.on_fp8_unavailable ==
    "error"`` a ``ValueError`` is raised; with ``"fallback"`` FP8 is skipped, and every
    head for which FP8 would have met the tolerance is recorded in ``plan.fallbacks``. If
    the policy allows nothing else usable, the fallback is bf16, else fp16, else fp32
    (whichever the device runs natively first).

    Args:
        q_stats: :func:`~adaattn_precision.tensor_stats` of Q ``(B, H, S, D)``.
        k_stats: Statistics of K (raw; smoothing is modelled from the statistics).
        v_stats: Statistics of V.
        policy: Policy; ``None`` uses :func:`~adaattn_precision.get_active_policy`.
        capability: Device capability (:func:`~adaattn_precision.detect`).
        scale: Softmax scale ``τ``.
        causal: Whether attention is causally masked (see :func:`predict_attention_error`).

    Returns:
        The per-head plan.

    Raises:
        ValueError: If FP8 is required but unavailable under an ``"error"`` policy, or on
            mismatched statistics or a bad scale.
        TypeError: If ``policy`` or ``capability`` has the wrong type.
    """
    from .policy import get_active_policy

    if policy is None:
        policy = get_active_policy()
    if not isinstance(policy, PrecisionPolicy):
        raise TypeError(f"policy must be a PrecisionPolicy or None, got {type(policy).__name__}")
    if not isinstance(capability, DeviceCapability):
        raise TypeError(
            f"capability must be a DeviceCapability (from detect()), got "
            f"{type(capability).__name__}"
        )
    missing_fp8 = [p for p in policy.allowed if is_fp8(p) and not capability.supports(p)]
    if missing_fp8 and policy.on_fp8_unavailable == "error":
        cc = ".".join(map(str, capability.compute_capability))
        raise ValueError(
            f"policy {policy.name!r} allows {missing_fp8} but device {capability.device} "
            f"({capability.name}, compute capability {cc}) has no FP8 tensor cores (needs "
            "sm >= 8.9); use on_fp8_unavailable='fallback' or remove FP8 from allowed"
        )

    fallback_choices = tuple(p for p in ("bf16", "fp16", "fp32") if p not in policy.allowed)
    predicted_all = _predict_many(
        q_stats, k_stats, v_stats, policy.allowed + fallback_choices, scale, policy.fp8, causal
    )
    errors: dict[str, tuple[float, ...]] = {
        p: tuple(float(e) for e in err.amax(dim=0).tolist())
        for p, err in predicted_all.items()
        if p in policy.allowed
    }
    num_heads = q_stats.shape[1]
    tol = policy.tolerance
    fp16_ok = (
        max(float(q_stats.amax.max()), float(k_stats.amax.max()), float(v_stats.amax.max()))
        < _FP16_MAX
    )

    precisions: list[str] = []
    predicted: list[float] = []
    reasons: list[str] = []
    fallbacks: list[tuple[int, str]] = []
    usable = [p for p in policy.allowed if capability.supports(p)]
    skipped = [p for p in policy.allowed if p not in usable]
    for h in range(num_heads):
        notes = [f"{p} not native on {capability.name}" for p in skipped]
        choice = next((p for p in usable if errors[p][h] <= tol), None)
        if choice is not None:
            above = [
                f"{p} predicted {errors[p][h]:.3g} > tol {tol:.3g}"
                for p in usable[: usable.index(choice)]
            ]
            reason = "; ".join(
                [*notes, *above, f"{choice} predicted {errors[choice][h]:.3g} <= tol {tol:.3g}"]
            )
        elif usable:
            choice = usable[-1]
            reason = "; ".join(
                [
                    *notes,
                    f"no allowed precision meets tol {tol:.3g}; using the most precise "
                    f"usable one, {choice} (predicted {errors[choice][h]:.3g})",
                ]
            )
        else:
            choice = _fallback_precision(capability, fp16_ok)
            errors.setdefault(
                choice, tuple(float(e) for e in predicted_all[choice].amax(dim=0).tolist())
            )
            reason = "; ".join([*notes, f"fell back to {choice}: no allowed precision usable"])
            fallbacks.append((h, reason))
        wanted = next((p for p in policy.allowed if errors[p][h] <= tol), None)
        if wanted is not None and is_fp8(wanted) and wanted in skipped and usable:
            fallbacks.append(
                (h, f"{wanted} meets tol but is not native on {capability.name}; used {choice}")
            )
        precisions.append(choice)
        predicted.append(errors[choice][h])
        reasons.append(reason)
    return PrecisionPlan(
        precisions=tuple(precisions),
        predicted_error=tuple(predicted),
        reasons=tuple(reasons),
        fallbacks=tuple(fallbacks),
        candidate_errors=errors,
        policy=policy,
        device=capability.device,
    )
