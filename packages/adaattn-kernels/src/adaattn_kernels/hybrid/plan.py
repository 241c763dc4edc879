"""Per-head hybrid attention plans: exact, or hybrid(window ``w``, sinks ``s``, rank ``r``).

A plan is three ``(batch, heads)`` ``int32`` tensors read directly by the Triton kernel, so heads
with different plans run in one launch. A head is *exact* when its segment size is ``0``; a
*hybrid* head attends exactly to its ``sinks`` first keys and to a local ``window`` of keys around
its diagonal, and to the rest of the keys (the *far field*) through segment means of size
``segment`` (see :mod:`adaattn_kernels.hybrid.naive` for the precise decomposition).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["HybridPlan", "segment_size_for_rank"]


def segment_size_for_rank(seq_len_k: int, rank: int) -> int:
    """Segment size ``ceil(seq_len_k / rank)`` that splits the key axis into ``rank`` segments.

    Args:
        seq_len_k: Number of keys (``≥ 1``).
        rank: Number of pooled segments over the whole key axis (``≥ 1``).

    Returns:
        The segment size ``g ≥ 1``; the key axis then has ``ceil(seq_len_k / g) ≤ rank``
        segments, the last one possibly shorter.

    Raises:
        ValueError: If ``seq_len_k`` or ``rank`` is smaller than 1.
    """
    if isinstance(seq_len_k, bool) or not isinstance(seq_len_k, int) or seq_len_k < 1:
        raise ValueError(f"seq_len_k must be an int >= 1, got {seq_len_k!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (number of far-field segments), got {rank!r}")
    return -(-seq_len_k // rank)


def _as_plan_tensor(
    value: int | torch.Tensor, name: str, shape: tuple[int, int], device: torch.device | None
) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        try:
            t = value.to(device=device if device is not None else value.device)
            t = t.to(torch.int32).expand(shape).contiguous()
        except RuntimeError as err:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to (batch, heads)={shape}"
            ) from err
        return t
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}")
    return torch.full(shape, value, dtype=torch.int32, device=device)


@dataclass(frozen=True, eq=False)
class HybridPlan:
    """Per-(batch, head) plan for :func:`adaattn_kernels.hybrid.hybrid_attention`.

    Build it with :meth:`exact`, :meth:`uniform` or :meth:`build` rather than directly; the
    constructor validates the tensors (one host synchronisation) and caches ``min_segment`` so the
    hot path never synchronises.

    The exact parts are widened to far-segment boundaries (sinks rounded up, window edges rounded
    outwards; see :mod:`adaattn_kernels.hybrid.naive`), so a hybrid head attends exactly to up to
    ``s + g − 1`` sink keys and ``w + 2(g − 1)`` window keys: compare plans at equal cost.

    Attributes:
        window: ``(B, H)`` int32, local window size ``w ≥ 1`` of hybrid heads (causal: the ``w``
            most recent allowed keys; non-causal: ``w`` keys centred on the query's diagonal).
        sinks: ``(B, H)`` int32, number ``s ≥ 0`` of leading "sink" keys kept exact.
        segment: ``(B, H)`` int32, far-field segment size ``g ≥ 1`` of hybrid heads; ``0`` marks an
            exact head (window and sinks are then ignored).
        min_segment: Smallest segment size over hybrid heads (``0`` if every head is exact); sizes
            the pooled buffers, ``ceil(seq_len_k / min_segment)`` segments per head. Computed.
        num_exact: Number of exact heads (computed; selects the kernel tuning class).
        head_order: ``(B·H,)`` int32 flattened head indices, exact heads first (computed): the
            kernel's launch order, longest programs first.
    """

    window: torch.Tensor
    sinks: torch.Tensor
    segment: torch.Tensor
    min_segment: int = field(init=False, default=-1)
    num_exact: int = field(init=False, default=-1)
    head_order: torch.Tensor = field(init=False, repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("window", "sinks", "segment"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"HybridPlan.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"HybridPlan.{name} must be int32, got {t.dtype}; use build()")
            if t.dim() != 2:
                raise ValueError(
                    f"HybridPlan.{name} must have shape (batch, heads), got {tuple(t.shape)}"
                )
            if t.shape != self.window.shape:
                raise ValueError(
                    f"HybridPlan.{name} has shape {tuple(t.shape)} but window has "
                    f"{tuple(self.window.shape)}; all plan tensors must share (batch, heads)"
                )
            if t.device != self.window.device:
                raise ValueError("HybridPlan tensors must all be on the same device")
        for name in ("window", "sinks", "segment"):
            t = getattr(self, name)
            if not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())
        seg = self.segment
        hybrid = seg > 0
        if self.window.numel() == 0:
            raise ValueError("HybridPlan needs at least one (batch, head); got an empty plan")
        stats = torch.stack(
            [
                seg.min(),
                self.sinks.min(),
                torch.where(hybrid, self.window, torch.ones_like(self.window)).min(),
                torch.where(hybrid, seg, torch.full_like(seg, torch.iinfo(torch.int32).max)).min(),
                (~hybrid).sum().to(seg.dtype),
            ]
        ).tolist()
        if stats[0] < 0:
            raise ValueError("HybridPlan.segment must be >= 0 (0 = exact head, g >= 1 = hybrid)")
        if stats[1] < 0:
            raise ValueError("HybridPlan.sinks must be >= 0")
        if stats[2] < 1:
            raise ValueError("HybridPlan.window must be >= 1 on hybrid heads (segment > 0)")
        min_seg = 0 if stats[3] == torch.iinfo(torch.int32).max else int(stats[3])
        object.__setattr__(self, "min_segment", min_seg)
        object.__setattr__(self, "num_exact", int(stats[4]))
        order = torch.argsort((seg.reshape(-1) != 0).to(torch.int8), stable=True)
        object.__setattr__(self, "head_order", order.to(torch.int32))

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, heads)`` covered by the plan."""
        return (int(self.window.shape[0]), int(self.window.shape[1]))

    @property
    def device(self) -> torch.device:
        """Device holding the plan tensors."""
        return self.window.device

    @property
    def kind(self) -> int:
        """``0`` every head exact, ``1`` every head hybrid, ``2`` mixed (host int, no sync)."""
        if self.num_exact == self.window.numel():
            return 0
        return 1 if self.num_exact == 0 else 2

    @property
    def is_exact(self) -> torch.Tensor:
        """``(B, H)`` bool tensor, True where the head is computed exactly."""
        return self.segment == 0

    def to(self, device: torch.device | str) -> HybridPlan:
        """Copy of the plan on ``device`` (no-op when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return HybridPlan(self.window.to(device), self.sinks.to(device), self.segment.to(device))

    def num_segments(self, seq_len_k: int) -> torch.Tensor:
        """``(B, H)`` int32 number of segments ``ceil(seq_len_k / g)`` (0 on exact heads)."""
        g = self.segment.clamp_min(1)
        return torch.where(self.segment > 0, (seq_len_k + g - 1) // g, 0).to(torch.int32)

    def max_segments(self, seq_len_k: int) -> int:
        """Largest segment count over heads, ``ceil(seq_len_k / min_segment)`` (0 if all exact)."""
        if self.min_segment == 0:
            return 0
        return -(-seq_len_k // self.min_segment)

    @classmethod
    def exact(
        cls, batch: int, heads: int, *, device: torch.device | str | None = None
    ) -> HybridPlan:
        """Plan where every head is exact."""
        z = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        return cls(z.clone(), z.clone(), z)

    @classmethod
    def uniform(
        cls,
        batch: int,
        heads: int,
        *,
        seq_len_k: int,
        window: int,
        rank: int,
        sinks: int = 0,
        device: torch.device | str | None = None,
    ) -> HybridPlan:
        """Plan where every head is hybrid(``window``, ``sinks``, ``rank``).

        Args:
            batch: Batch size ``B``.
            heads: Number of query heads ``H``.
            seq_len_k: Number of keys; the far-field segment size is
                :func:`segment_size_for_rank` ``(seq_len_k, rank)``.
            window: Local window size ``w ≥ 1``.
            rank: Segments over the whole key axis ``r ≥ 1``.
            sinks: Leading sink keys kept exact.
            device: Device of the plan tensors (put them on the inputs' device).
        """
        return cls.build(
            batch,
            heads,
            seq_len_k=seq_len_k,
            window=window,
            rank=rank,
            sinks=sinks,
            exact=False,
            device=device,
        )

    @classmethod
    def build(
        cls,
        batch: int,
        heads: int,
        *,
        seq_len_k: int,
        window: int | torch.Tensor,
        rank: int | torch.Tensor,
        sinks: int | torch.Tensor = 0,
        exact: bool | torch.Tensor = False,
        device: torch.device | str | None = None,
    ) -> HybridPlan:
        """Per-head plan from broadcastable ``window``/``rank``/``sinks``/``exact`` values.

        Args:
            batch: Batch size ``B``.
            heads: Number of query heads ``H``.
            seq_len_k: Number of keys; rank ``r`` becomes segment size ``ceil(seq_len_k / r)``.
            window: Window size(s), int or integer tensor broadcastable to ``(B, H)``.
            rank: Rank(s) ``r ≥ 1`` for hybrid heads, int or tensor broadcastable to ``(B, H)``.
            sinks: Sink count(s), int or tensor broadcastable to ``(B, H)``.
            exact: Bool or bool tensor broadcastable to ``(B, H)``; True heads are exact.
            device: Device of the plan tensors; defaults to the device of a tensor argument.

        Raises:
            ValueError: On non-broadcastable shapes, ``rank < 1`` or ``window < 1`` on hybrid
                heads, negative sinks, or ``seq_len_k < 1``.
            TypeError: On non-integer values.
        """
        if isinstance(seq_len_k, bool) or not isinstance(seq_len_k, int) or seq_len_k < 1:
            raise ValueError(f"seq_len_k must be an int >= 1, got {seq_len_k!r}")
        if device is None:
            for val in (window, rank, sinks, exact):
                if isinstance(val, torch.Tensor):
                    device = val.device
                    break
        dev = torch.device(device) if device is not None else None
        shape = (batch, heads)
        if isinstance(exact, torch.Tensor):
            if exact.dtype != torch.bool:
                raise TypeError(f"exact must be a bool tensor, got {exact.dtype}")
            ex = exact.to(dev if dev is not None else exact.device).expand(shape)
        elif isinstance(exact, bool):
            ex = torch.full(shape, exact, dtype=torch.bool, device=dev)
        else:
            raise TypeError(f"exact must be a bool or a bool tensor, got {type(exact).__name__}")
        w = _as_plan_tensor(window, "window", shape, dev)
        r = _as_plan_tensor(rank, "rank", shape, dev)
        s = _as_plan_tensor(sinks, "sinks", shape, dev)
        if bool(((r < 1) & ~ex).any()):
            raise ValueError("rank must be >= 1 on hybrid heads (set exact=True instead of rank 0)")
        g = (seq_len_k + r.clamp_min(1) - 1) // r.clamp_min(1)
        g = torch.where(ex, torch.zeros_like(g), g).to(torch.int32)
        return cls(w, s, g)
