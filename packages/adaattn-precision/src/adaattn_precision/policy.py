"""Precision policies: which dtypes a head may use and how much error it may add.

A :class:`PrecisionPolicy` is an immutable description of the user's trade-off. It lists
the allowed precisions, the error tolerance a head must meet to drop to a cheaper one
(relative Frobenius error of the attention output, see
:func:`adaattn_precision.select_precision`), the FP8 scaling recipe (:class:`FP8Config`)
and what to do when FP8 is requested on a device without FP8 tensor cores.

Policies are plain data: they round-trip through :meth:`PrecisionPolicy.to_dict` /
:meth:`PrecisionPolicy.from_dict` and JSON, and they work as context managers that set
the active policy for the current thread or asyncio task (``contextvars``)::

    with PrecisionPolicy.preset("speed"):
        assert get_active_policy().name == "speed"
"""

from __future__ import annotations

import json
import math
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from types import TracebackType
from typing import Any, Literal

import torch

__all__ = [
    "FP8_FORMATS",
    "GRANULARITIES",
    "PRECISIONS",
    "PRESETS",
    "FP8Config",
    "PrecisionPolicy",
    "get_active_policy",
    "is_fp8",
    "torch_dtype",
]

#: Precision names, from cheapest to most precise.
PRECISIONS: tuple[str, ...] = ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "fp32")
#: FP8 formats (OCP): e4m3 = ``torch.float8_e4m3fn``, e5m2 = ``torch.float8_e5m2``.
FP8_FORMATS: tuple[str, ...] = ("e4m3", "e5m2")
#: FP8 scaling granularities, see :func:`adaattn_precision.quantize_fp8`.
GRANULARITIES: tuple[str, ...] = ("tensor", "block", "token")
#: Behaviours when FP8 is allowed but the device has no FP8 tensor cores.
FP8_UNAVAILABLE_BEHAVIOURS: tuple[str, ...] = ("error", "fallback")
#: Names accepted by :meth:`PrecisionPolicy.preset`.
PRESETS: tuple[str, ...] = ("quality", "balanced", "speed")

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

Fp8Format = Literal["e4m3", "e5m2"]
Granularity = Literal["tensor", "block", "token"]
Fp8Unavailable = Literal["error", "fallback"]


def torch_dtype(name: str) -> torch.dtype:
    """Map a precision name (``"fp8_e4m3"``, ``"bf16"``, ...) to its ``torch.dtype``.

    Raises:
        ValueError: If ``name`` is not one of :data:`PRECISIONS`.
    """
    if name not in _TORCH_DTYPES:
        raise ValueError(f"precision name must be one of {list(PRECISIONS)}, got {name!r}")
    return _TORCH_DTYPES[name]


def is_fp8(name: str) -> bool:
    """Whether a precision name denotes an FP8 format."""
    return name.startswith("fp8_")


def _check_choice(argument: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")


def _check_int(argument: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")


def _from_mapping(cls_name: str, data: object, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{cls_name}.from_dict expects a dict, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(
            f"{cls_name}.from_dict got unknown key(s) {sorted(unknown)}; "
            f"valid keys are {sorted(allowed)}"
        )
    return dict(data)


@dataclass(frozen=True)
class FP8Config:
    """FP8 quantisation recipe shared by the error model and the FP8 kernels.

    The fields are exactly the keyword options of :func:`adaattn_precision.quantize_fp8`.

    Attributes:
        fmt: ``"e4m3"`` (3 mantissa bits, max 448; the default for inference) or ``"e5m2"``
            (2 mantissa bits, max 57344).
        granularity: One scale per ``"tensor"`` (per (batch, head) matrix), per ``"block"``
            of ``block_size`` tokens, or per ``"token"``.
        block_size: Tokens per scaling block along the sequence dimension (``"block"``).
        margin: Head-room exponent: the block maximum maps to ``fp8_max / 2**margin``.
        pow2_scales: Round every scale up to a power of two (exact rescaling).
        smooth_k: Subtract K's mean over the sequence before quantising (exact under
            softmax, SageAttention, Zhang et al. 2024, Sec. 3.2).
    """

    fmt: Fp8Format = "e4m3"
    granularity: Granularity = "block"
    block_size: int = 128
    margin: int = 0
    pow2_scales: bool = False
    smooth_k: bool = True

    def __post_init__(self) -> None:
        _check_choice("fmt", self.fmt, FP8_FORMATS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_int("block_size", self.block_size, 1)
        _check_int("margin", self.margin, 0)
        if not isinstance(self.pow2_scales, bool):
            raise TypeError(f"pow2_scales must be a bool, got {type(self.pow2_scales).__name__}")
        if not isinstance(self.smooth_k, bool):
            raise TypeError(f"smooth_k must be a bool, got {type(self.smooth_k).__name__}")

    @property
    def precision(self) -> str:
        """The precision name of this format (``"fp8_e4m3"`` or ``"fp8_e5m2"``)."""
        return f"fp8_{self.fmt}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FP8Config:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        return cls(**_from_mapping("FP8Config", data, {f.name for f in fields(cls)}))


_ACTIVE: ContextVar[tuple[PrecisionPolicy, ...]] = ContextVar(
    "adaattn_precision_active_policy", default=()
)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which precisions heads may use, and the error a head may add to drop precision.

    Use a preset (:meth:`preset`: ``"quality"``, ``"balanced"``, ``"speed"``) or build a
    custom policy. Instances are immutable; derive variants with :meth:`replace`.

    Attributes:
        name: Label, e.g. the preset name or ``"custom"``.
        allowed: Allowed precision names (subset of :data:`PRECISIONS`). The selector tries
            them from cheapest to most precise.
        tolerance: Largest predicted relative error of the attention output (Frobenius,
            per head) accepted for a cheaper precision; must be > 0.
        fp8: FP8 scaling recipe.
        on_fp8_unavailable: ``"error"`` raises when FP8 is allowed but the device has no
            FP8 tensor cores; ``"fallback"`` uses the next allowed precision (or, if only
            FP8 was allowed, the most precise native one) and records the fallback.
    """

    name: str = "custom"
    allowed: tuple[str, ...] = ("fp8_e4m3", "bf16", "fp16", "fp32")
    tolerance: float = 0.08
    fp8: FP8Config = field(default_factory=FP8Config)
    on_fp8_unavailable: Fp8Unavailable = "fallback"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if isinstance(self.allowed, str) or not isinstance(self.allowed, (tuple, list)):
            raise TypeError(
                f"allowed must be a tuple of precision names, got {type(self.allowed).__name__}"
            )
        allowed = tuple(self.allowed)
        if not allowed:
            raise ValueError(f"allowed must name at least one of {list(PRECISIONS)}")
        for name in allowed:
            _check_choice("allowed", name, PRECISIONS)
        if len(set(allowed)) != len(allowed):
            raise ValueError(f"allowed has duplicates: {list(allowed)}")
        # Canonical order: cheapest first.
        object.__setattr__(self, "allowed", tuple(p for p in PRECISIONS if p in allowed))
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
            raise TypeError(f"tolerance must be a float, got {type(self.tolerance).__name__}")
        if not math.isfinite(self.tolerance) or self.tolerance <= 0:
            raise ValueError(
                f"tolerance must be a finite float > 0 (a relative error such as 0.05), "
                f"got {self.tolerance!r}"
            )
        object.__setattr__(self, "tolerance", float(self.tolerance))
        if not isinstance(self.fp8, FP8Config):
            raise TypeError(f"fp8 must be an FP8Config, got {type(self.fp8).__name__}")
        _check_choice("on_fp8_unavailable", self.on_fp8_unavailable, FP8_UNAVAILABLE_BEHAVIOURS)
        if any(is_fp8(p) for p in allowed) and self.fp8.precision not in allowed:
            raise ValueError(
                f"allowed contains FP8 precision(s) {[p for p in allowed if is_fp8(p)]} but "
                f"fp8.fmt is {self.fp8.fmt!r}; allow {self.fp8.precision!r} or change fp8.fmt"
            )

    @property
    def allows_fp8(self) -> bool:
        """Whether any FP8 precision is allowed."""
        return any(is_fp8(p) for p in self.allowed)

    @classmethod
    def preset(cls, name: str) -> PrecisionPolicy:
        """Return a named preset.

        * ``"quality"``: bf16 / fp16 / fp32 only (no FP8), tolerance 0.01.
        * ``"balanced"``: FP8 e4m3 with per-block (128-token) scales and K smoothing where
          the predicted error is <= 0.08, else bf16 / fp16 / fp32; falls back (recorded)
          when FP8 is unavailable.
        * ``"speed"``: as balanced with tolerance 0.15.

        Tolerances are relative Frobenius errors of a head's attention output. For
        reference, e4m3 with per-block scales measures 0.03-0.07 on heads with i.i.d.
        N(0, 1) inputs and moderate scores (the worst case for relative error: a zero-mean
        V makes the output small), less when V has a mean, more for peaked softmax.

        Args:
            name: One of :data:`PRESETS`.

        Raises:
            ValueError: For an unknown name; the message lists the valid names.
        """
        if name == "quality":
            return cls(name="quality", allowed=("bf16", "fp16", "fp32"), tolerance=0.01)
        if name == "balanced":
            return cls(
                name="balanced",
                allowed=("fp8_e4m3", "bf16", "fp16", "fp32"),
                tolerance=0.08,
                fp8=FP8Config(fmt="e4m3", granularity="block", block_size=128),
            )
        if name == "speed":
            return cls(
                name="speed",
                allowed=("fp8_e4m3", "bf16", "fp16", "fp32"),
                tolerance=0.15,
                fp8=FP8Config(fmt="e4m3", granularity="block", block_size=128),
            )
        raise ValueError(f"unknown precision policy preset {name!r}; valid presets: {PRESETS}")

    def replace(self, **changes: Any) -> PrecisionPolicy:
        """Return a copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``fp8`` nested)."""
        return {
            "name": self.name,
            "allowed": list(self.allowed),
            "tolerance": self.tolerance,
            "fp8": self.fp8.to_dict(),
            "on_fp8_unavailable": self.on_fp8_unavailable,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionPolicy:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        kwargs = _from_mapping("PrecisionPolicy", data, {f.name for f in fields(cls)})
        if "allowed" in kwargs and isinstance(kwargs["allowed"], list):
            kwargs["allowed"] = tuple(kwargs["allowed"])
        if "fp8" in kwargs and not isinstance(kwargs["fp8"], FP8Config):
            kwargs["fp8"] = FP8Config.from_dict(kwargs["fp8"])
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        """Serialise to JSON; keyword arguments go to :func:`json.dumps`."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PrecisionPolicy:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: If ``text`` is not valid JSON or describes an invalid policy.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"text is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def __enter__(self) -> PrecisionPolicy:
        _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = _ACTIVE.get()
        if not stack or stack[-1] is not self:
            raise RuntimeError("PrecisionPolicy contexts were exited out of order")
        _ACTIVE.set(stack[:-1])


def get_active_policy() -> PrecisionPolicy:
    """Return the innermost policy entered with ``with policy:`` in this context.

    Without an active policy this returns ``PrecisionPolicy.preset("balanced")``.
    """
    stack = _ACTIVE.get()
    return stack[-1] if stack else PrecisionPolicy.preset("balanced")
