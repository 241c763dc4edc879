"""Where each attention call ran: counts of exact, adaptive and fallback calls, with reasons.

Every call of :func:`adaattn.scaled_dot_product_attention` (and therefore of
:class:`adaattn.AdaptiveAttention` and the transformers integration) is recorded here. A call
that could not run on AdaAttn's kernels runs on ``torch`` SDPA instead; that is never silent:
it is counted under its reason and an :class:`~adaattn.exceptions.AdaAttnFallbackWarning` is
emitted (once per reason under Python's default warning filter).

Example:
    >>> import torch, adaattn
    >>> adaattn.reset_dispatch_stats()
    >>> q = k = v = torch.randn(1, 2, 8, 16)
    >>> _ = adaattn.scaled_dot_product_attention(q, k, v)
    >>> adaattn.dispatch_stats().exact
    1
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field

from adaattn.exceptions import AdaAttnFallbackWarning

__all__ = ["DispatchStats", "dispatch_stats", "reset_dispatch_stats"]


@dataclass(frozen=True)
class DispatchStats:
    """A snapshot of the dispatch counters.

    Attributes:
        exact: Calls computed exactly by the dense AdaAttn kernel.
        adaptive: Calls computed under an adaptive plan (some heads FP8 or low-rank).
        fallback: Calls handed to ``torch`` SDPA, by reason.
    """

    exact: int = 0
    adaptive: int = 0
    fallback: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All recorded calls."""
        return self.exact + self.adaptive + sum(self.fallback.values())


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exact = 0
        self._adaptive = 0
        self._fallback: Counter[str] = Counter()

    def exact(self) -> None:
        with self._lock:
            self._exact += 1

    def adaptive(self) -> None:
        with self._lock:
            self._adaptive += 1

    def fallback(self, reason: str) -> None:
        with self._lock:
            self._fallback[reason] += 1
        warnings.warn(
            f"adaattn: ran torch SDPA instead of the AdaAttn kernels: {reason}",
            AdaAttnFallbackWarning,
            stacklevel=4,
        )

    def snapshot(self) -> DispatchStats:
        with self._lock:
            return DispatchStats(self._exact, self._adaptive, dict(self._fallback))

    def reset(self) -> None:
        with self._lock:
            self._exact = 0
            self._adaptive = 0
            self._fallback.clear()


_RECORDER = _Recorder()


def dispatch_stats() -> DispatchStats:
    """Return the counts of exact, adaptive and fallback calls since the last reset."""
    return _RECORDER.snapshot()


def reset_dispatch_stats() -> None:
    """Set every dispatch counter back to zero."""
    _RECORDER.reset()
