"""Configuration of adaptive attention: the error budget and what the planner may do.

An :class:`AdaAttnConfig` is immutable plain data. The default instance is *exact*: every call
runs the dense kernel and matches ``torch`` SDPA. Allowing the ``"fp8"`` and ``"hybrid"`` modes
lets the planner (:mod:`adaattn.planner`) pick, per layer and head, the cheapest plan whose
sampled error estimate meets ``tolerance``.

Example:
    >>> from adaattn import AdaAttnConfig
    >>> AdaAttnConfig().is_exact
    True
    >>> cfg = AdaAttnConfig.adaptive(tolerance=0.02)
    >>> cfg.modes
    ('exact', 'fp8', 'hybrid')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Union

from adaattn._backends import PrecisionPolicy, get_active_policy

__all__ = ["MODES", "REPLAN_CHOICES", "AdaAttnConfig", "Mode", "Replan"]

#: Execution modes of one head, from most to least precise.
MODES: tuple[str, ...] = ("exact", "fp8", "hybrid")
#: The string values accepted by ``AdaAttnConfig.replan`` (besides a positive int).
REPLAN_CHOICES: tuple[str, ...] = ("every_call", "per_bucket")

Mode = Literal["exact", "fp8", "hybrid"]
Replan = Union[Literal["every_call", "per_bucket"], int]  # noqa: UP007 (a runtime alias on 3.10)


@dataclass(frozen=True)
class AdaAttnConfig:
    """What adaptive attention may do, and the error it may add.

    Attributes:
        tolerance: Largest estimated relative error of a head's output,
            ``‖O_plan − O_exact‖_F / ‖O_exact‖_F``, the planner accepts for a cheaper plan.
            ``None`` uses the precision policy's tolerance.
        policy: An ``adaattn_precision.PrecisionPolicy``, a preset name (``"quality"``,
            ``"balanced"``, ``"speed"``) or ``None`` for the policy active at call time
            (``with PrecisionPolicy.preset("speed"): ...``). It decides whether FP8 is allowed
            and the FP8 scaling recipe.
        modes: Modes a head may use; must contain ``"exact"`` (the plan every head can fall
            back to). ``("exact",)``, the default, makes every call exact.
        sample_size: Query rows sampled per head to estimate a candidate's error (and its
            entropy); larger is more accurate and slower to plan.
        replan: When to plan again: ``"every_call"``; an int ``N`` (every ``N`` calls of a
            layer for the same sequence-length bucket); ``"per_bucket"`` (once per
            power-of-two bucket of the key length, then reused).
        min_seq_len: Calls whose key length is below this run exact without planning (short
            sequences gain nothing from cheaper plans).
        hybrid_windows: Near-field window sizes (keys each side of the diagonal computed
            exactly) the planner tries for ``"hybrid"`` heads. Candidates that would read as
            many keys as exact attention are dropped per call, so the large windows only come
            into play at long key lengths (a 2048 window is cheaper than FP8 from 8k keys on).
        hybrid_ranks: Far-field ranks (pooled segments over the whole key axis) the planner
            tries for ``"hybrid"`` heads. The segment size is ``⌈key length / rank⌉``, so at a
            fixed rank it grows with the context and the pooling error with it; the larger ranks
            keep segments short at long key lengths.
        seed: Seed of the row sampling, so plans are reproducible.
        predict_samples: Query rows the hybrid error *predictor* reads (at most
            ``sample_size``) to shortlist ``(window, rank)`` candidates; the shortlisted ones are
            then measured on ``sample_size`` rows, and only measurements decide. Fewer rows plan
            faster (the predictor scores the whole grid) at the price of more missed picks.
        error_confidence: ``None`` (default) accepts a candidate on its measured error on the
            sampled rows (the ratio estimator). A level such as ``0.95`` accepts it only if the
            one-sided upper confidence bound of that estimate meets the tolerance (delta method
            over the sampled rows). On real heads the error sits in few rows, so the point
            estimate is more often low than high; the bound plans more conservatively.
    """

    tolerance: float | None = None
    policy: PrecisionPolicy | str | None = None
    modes: tuple[str, ...] = ("exact",)
    sample_size: int = 256
    replan: Replan = "per_bucket"
    min_seq_len: int = 1024
    hybrid_windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    hybrid_ranks: tuple[int, ...] = (16, 32, 64, 128, 256)
    seed: int = 0
    predict_samples: int = 64
    error_confidence: float | None = None

    def __post_init__(self) -> None:
        if self.tolerance is not None:
            if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
                raise TypeError(
                    f"tolerance must be a float or None, got {type(self.tolerance).__name__}"
                )
            if not math.isfinite(self.tolerance) or not 0.0 < self.tolerance < 1.0:
                raise ValueError(
                    "tolerance must be a relative error in (0, 1), such as 0.01; "
                    f"got {self.tolerance!r}"
                )
            object.__setattr__(self, "tolerance", float(self.tolerance))
        if isinstance(self.policy, str):
            try:
                object.__setattr__(self, "policy", PrecisionPolicy.preset(self.policy))
            except ValueError as exc:
                raise ValueError(f"policy: {exc}") from None
        elif self.policy is not None and not isinstance(self.policy, PrecisionPolicy):
            raise TypeError(
                "policy must be an adaattn_precision.PrecisionPolicy, a preset name or None, "
                f"got {type(self.policy).__name__}"
            )
        modes = self.modes
        if isinstance(modes, str) or not isinstance(modes, (tuple, list)):
            raise TypeError(
                f"modes must be a tuple of mode names from {MODES}, got {type(modes).__name__}"
            )
        for m in modes:
            if m not in MODES:
                raise ValueError(f"modes: unknown mode {m!r}; valid modes are {MODES}")
        if len(set(modes)) != len(modes):
            raise ValueError(f"modes has duplicates: {list(modes)}")
        if "exact" not in modes:
            raise ValueError(
                "modes must contain 'exact' (every head falls back to it when no cheaper plan "
                f"meets the tolerance); got {tuple(modes)}"
            )
        object.__setattr__(self, "modes", tuple(m for m in MODES if m in modes))
        ec = self.error_confidence
        if ec is not None and (
            isinstance(ec, bool) or not isinstance(ec, (int, float)) or not 0.5 < ec < 1.0
        ):
            raise ValueError(
                f"error_confidence must be None or a level in (0.5, 1) such as 0.95, got {ec!r}"
            )
        _check_int("sample_size", self.sample_size, 1)
        _check_int("predict_samples", self.predict_samples, 1)
        _check_int("min_seq_len", self.min_seq_len, 0)
        _check_int("seed", self.seed, 0)
        if isinstance(self.replan, str):
            if self.replan not in REPLAN_CHOICES:
                raise ValueError(
                    f"replan must be 'every_call', 'per_bucket' or a positive int, "
                    f"got {self.replan!r}"
                )
        else:
            _check_int("replan", self.replan, 1)
        for name in ("hybrid_windows", "hybrid_ranks"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
                raise TypeError(f"{name} must be a tuple of positive ints, got {values!r}")
            if not values:
                raise ValueError(f"{name} must not be empty")
            for x in values:
                _check_int(name, x, 1)
            object.__setattr__(self, name, tuple(sorted(set(values))))

    @classmethod
    def adaptive(
        cls,
        tolerance: float | None = 0.02,
        *,
        policy: PrecisionPolicy | str | None = "balanced",
        **options: Any,
    ) -> AdaAttnConfig:
        """A config that allows every mode (exact, FP8, hybrid low-rank).

        Args:
            tolerance: Per-head relative output error budget (``None``: the policy's).
            policy: Precision policy or preset name (default ``"balanced"``, which allows FP8).
            **options: Any other :class:`AdaAttnConfig` field.

        Returns:
            The config.
        """
        return cls(tolerance=tolerance, policy=policy, modes=MODES, **options)

    @property
    def is_exact(self) -> bool:
        """Whether only the exact mode is allowed (every call matches torch SDPA)."""
        return self.modes == ("exact",)

    def resolved_policy(self) -> PrecisionPolicy:
        """The precision policy in force: ``policy``, or the one active in this context."""
        if isinstance(self.policy, PrecisionPolicy):
            return self.policy
        return get_active_policy()

    def resolved_tolerance(self) -> float:
        """The per-head error budget: ``tolerance``, or the resolved policy's."""
        if self.tolerance is not None:
            return self.tolerance
        return self.resolved_policy().tolerance

    @property
    def replan_interval(self) -> int | None:
        """Calls between plans for one layer and bucket (``None``: plan once per bucket)."""
        if self.replan == "every_call":
            return 1
        if self.replan == "per_bucket":
            return None
        assert isinstance(self.replan, int)
        return self.replan

    def replace(self, **changes: Any) -> AdaAttnConfig:
        """Return a copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the policy as its own dict, or ``None``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PrecisionPolicy):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
