"""The sampled relative error of an approximation and its one-sided upper confidence bound."""

from __future__ import annotations

from statistics import NormalDist

import torch


def check_confidence(confidence: float | None) -> None:
    """Raise ``ValueError`` unless ``confidence`` is ``None`` or in ``(0.5, 1)``."""
    if confidence is not None and not (
        isinstance(confidence, float | int) and 0.5 < float(confidence) < 1.0
    ):
        raise ValueError(
            f"confidence must be None or a probability in (0.5, 1), e.g. 0.95; got {confidence!r}"
        )


def relative_error_from_rows(
    num: torch.Tensor, den: torch.Tensor, *, confidence: float | None = None, complete: bool
) -> torch.Tensor:
    """``sqrt(Σ num / Σ den)`` over the last dim, or its upper confidence bound.

    ``num[..., i] = ‖Õ_i − O_i‖²`` and ``den[..., i] = ‖O_i‖²`` over ``m`` sampled rows ``i``.
    ``Σ num / Σ den`` is the ratio estimator of the squared relative error of all rows. With
    ``confidence`` (and ``complete`` false: the rows are a sample), the squared ratio ``R`` is
    raised to ``R + z·se(R)``, ``z`` the normal quantile of ``confidence`` and
    ``se(R)² = Σ (num_i − R·den_i)² / (m (m − 1) · mean(den)²)`` the delta-method variance of a
    ratio estimator (Cochran, *Sampling Techniques*, 3rd ed., 1977, eq. 6.9). Errors concentrated
    in a few rows give large ``se``, so a sample that caught some of them is not trusted at face
    value; a sample that caught none cannot know, which is why the bound is one-sided and opt-in.

    Args:
        num: Squared error per row ``(..., m)``, float64 preferred.
        den: Squared reference norm per row ``(..., m)``.
        confidence: One-sided level in ``(0.5, 1)``, or ``None`` for the point estimate.
        complete: The rows are all rows (no sampling error: the point estimate is returned).

    Returns:
        ``(...)`` relative errors (0 where ``Σ den`` is 0), in ``num``'s dtype.
    """
    check_confidence(confidence)
    total = den.sum(-1)
    safe = total.clamp_min(1e-300)
    r = num.sum(-1) / safe
    m = num.shape[-1]
    if confidence is not None and not complete and m >= 2:
        z = NormalDist().inv_cdf(float(confidence))
        resid = (num - r[..., None] * den).square().sum(-1)
        mean_den = safe / m
        r = r + z * (resid / (m * (m - 1))).sqrt() / mean_den
    return torch.where(total > 0, r.sqrt(), torch.zeros_like(r))
