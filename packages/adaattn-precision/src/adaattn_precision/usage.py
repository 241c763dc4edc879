"""Counting precision decisions across calls: :class:`PrecisionStats`.

The planner records every :class:`~adaattn_precision.PrecisionPlan` it executes, tagged
with the layer it belongs to; the counters answer "how many heads ran in FP8, per layer,
and which fell back and why". Stats from several workers or steps merge with ``+``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .policy import PRECISIONS
from .select import PrecisionPlan

__all__ = ["PrecisionStats"]

Layer = str


def _layer_key(layer: object) -> Layer:
    if layer is None:
        return "-"
    if isinstance(layer, (str, int)) and not isinstance(layer, bool):
        return str(layer)
    raise TypeError(f"layer must be a str, an int or None, got {type(layer).__name__}")


@dataclass
class PrecisionStats:
    """Mutable counters of per-head precision decisions.

    Attributes:
        calls: Number of plans recorded.
        by_dtype: Head decisions per precision name.
        by_layer: Head decisions per ``(layer, precision)``.
        by_head: Head decisions per ``(layer, head, precision)``.
        fallbacks: ``(layer, head, reason)`` for every recorded fallback, in order.
    """

    calls: int = 0
    by_dtype: Counter[str] = field(default_factory=Counter)
    by_layer: Counter[tuple[Layer, str]] = field(default_factory=Counter)
    by_head: Counter[tuple[Layer, int, str]] = field(default_factory=Counter)
    fallbacks: list[tuple[Layer, int, str]] = field(default_factory=list)

    def record(self, plan: PrecisionPlan, *, layer: str | int | None = None) -> None:
        """Count the decisions of one plan.

        Args:
            plan: The plan that was executed.
            layer: Layer name or index (``None`` is shown as ``"-"``).

        Raises:
            TypeError: If ``plan`` is not a :class:`PrecisionPlan` or ``layer`` has a bad
                type.
        """
        if not isinstance(plan, PrecisionPlan):
            raise TypeError(f"plan must be a PrecisionPlan, got {type(plan).__name__}")
        key = _layer_key(layer)
        self.calls += 1
        for head, precision in enumerate(plan.precisions):
            self.by_dtype[precision] += 1
            self.by_layer[(key, precision)] += 1
            self.by_head[(key, head, precision)] += 1
        for head, reason in plan.fallbacks:
            self.fallbacks.append((key, head, reason))

    @property
    def total(self) -> int:
        """Total number of head decisions."""
        return sum(self.by_dtype.values())

    @property
    def num_fallbacks(self) -> int:
        """Number of recorded fallbacks."""
        return len(self.fallbacks)

    def fraction(self, precision: str) -> float:
        """Fraction of head decisions that chose ``precision`` (0 when empty)."""
        return self.by_dtype[precision] / self.total if self.total else 0.0

    def merge(self, other: PrecisionStats) -> PrecisionStats:
        """Return a new object with the counts of ``self`` and ``other`` added."""
        if not isinstance(other, PrecisionStats):
            raise TypeError(f"other must be a PrecisionStats, got {type(other).__name__}")
        return PrecisionStats(
            calls=self.calls + other.calls,
            by_dtype=self.by_dtype + other.by_dtype,
            by_layer=self.by_layer + other.by_layer,
            by_head=self.by_head + other.by_head,
            fallbacks=[*self.fallbacks, *other.fallbacks],
        )

    def __add__(self, other: object) -> PrecisionStats:
        if not isinstance(other, PrecisionStats):
            return NotImplemented
        return self.merge(other)

    def reset(self) -> None:
        """Clear all counters in place."""
        self.calls = 0
        self.by_dtype.clear()
        self.by_layer.clear()
        self.by_head.clear()
        self.fallbacks.clear()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary."""
        return {
            "calls": self.calls,
            "by_dtype": dict(self.by_dtype),
            "by_layer": [[lay, p, n] for (lay, p), n in sorted(self.by_layer.items())],
            "by_head": [[lay, h, p, n] for (lay, h, p), n in sorted(self.by_head.items())],
            "fallbacks": [list(f) for f in self.fallbacks],
        }

    def _columns(self) -> list[str]:
        used = {p for _, p in self.by_layer}
        return [p for p in PRECISIONS if p in used]

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-layer table (one row per layer plus a total row)."""
        cols = self._columns()
        header = ["layer", *cols, "fallbacks"]
        layers = sorted({lay for lay, _ in self.by_layer}, key=_natural)
        fb = Counter(lay for lay, _, _ in self.fallbacks)
        rows = [
            [lay, *(str(self.by_layer[(lay, p)]) for p in cols), str(fb[lay])] for lay in layers
        ]
        rows.append(["total", *(str(self.by_dtype[p]) for p in cols), str(len(self.fallbacks))])
        return header, rows

    def to_table(self, *, max_fallbacks: int = 10) -> str:
        """Plain-text table of decisions per layer and precision, then the fallbacks.

        Args:
            max_fallbacks: How many fallback reasons to list (the rest are counted).
        """
        header, rows = self.table_rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )

        lines = [
            f"PrecisionStats: {self.calls} call(s), {self.total} head decision(s)",
            fmt(header),
            "  ".join("-" * w for w in widths),
            *(fmt(r) for r in rows),
        ]
        if self.fallbacks:
            lines.append(f"fallbacks ({len(self.fallbacks)}):")
            for lay, head, reason in self.fallbacks[:max_fallbacks]:
                lines.append(f"  layer {lay} head {head}: {reason}")
            if len(self.fallbacks) > max_fallbacks:
                lines.append(f"  ... {len(self.fallbacks) - max_fallbacks} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)
