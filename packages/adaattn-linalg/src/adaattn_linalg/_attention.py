"""Blockwise attention-score tiles and the streaming (online log-sum-exp) pass.

Shared by :mod:`adaattn_linalg.entropy` and :class:`adaattn_linalg.operators.AttentionOperator`.
Scores ``s_ij = scale · q_i · k_j`` are produced one ``(block_q, block_k)`` tile at a time, so no
function here ever holds more than a few tiles plus O(seq · head_dim) inputs.

Online statistics (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", and the
FlashAttention recurrence, Dao et al. 2022, Alg. 1): per query row keep the running max ``m``, the
running sum ``l = Σ e^{s-m}`` and ``t = Σ e^{s-m} (s - m)``. When the max moves from ``m`` to
``m'`` both sums rescale by ``α = e^{m - m'}`` and ``t`` also shifts by ``(m - m') l``. At the end
``lse = m + log l`` and the Shannon entropy of the row is ``H = log l - t / l`` (the shifted form of
``H = log l + m - Σ e^{s-m} s / l``, which avoids cancellation when scores are large).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from adaattn_linalg._validation import check_choice, check_float, check_int, check_tensor

# Elements per score tile (all batch entries and heads together). 2**24 fp32 elements = 64 MiB;
# the streaming pass keeps about four such temporaries alive.
_TILE_ELEMENTS = 1 << 24


@dataclass
class AttentionProblem:
    """Validated, flattened inputs of one attention-score problem (rows may be a subset)."""

    q: torch.Tensor  # (N, Hkv, G, R, D), compute dtype, already multiplied by `scale`
    k: torch.Tensor  # (N, Hkv, Sk, D), compute dtype
    batch_shape: tuple[int, ...]  # original leading dims (*B, Hq)
    sq: int  # query length of the full problem (causal alignment uses it)
    row_pos: torch.Tensor | None  # (R,) sorted row positions on the device; None = all rows
    row_pos_host: list[int] | None
    mask: (
        torch.Tensor | None
    )  # view broadcast to (*B, Hq, Sq, Sk); bool (True = attend) or additive
    causal_offset: int | None  # key j allowed iff j <= pos + offset
    window: int | None  # local window (see `window_allows`)
    window_causal: bool
    diag_offset: int  # centre of the local window for row pos: pos + diag_offset
    block_q: int
    block_k: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def hq(self) -> int:
        return self.q.shape[1] * self.q.shape[2]

    @property
    def rows(self) -> int:
        return self.q.shape[3]

    @property
    def sk(self) -> int:
        return self.k.shape[2]

    def pos_range(self, i0: int, i1: int) -> tuple[int, int]:
        if self.row_pos_host is None:
            return i0, i1 - 1
        return self.row_pos_host[i0], self.row_pos_host[i1 - 1]

    def tile_empty(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True when every (row, key) pair of the tile is excluded by causality or the window."""
        lo, hi = self.pos_range(i0, i1)
        if self.causal_offset is not None and j0 > hi + self.causal_offset:
            return True
        if self.window is not None:
            w = self.window
            if j1 - 1 <= lo + self.diag_offset - w:  # every key left of every row's window
                return True
            if not self.window_causal and j0 >= hi + self.diag_offset + w:
                return True
            if self.window_causal and j0 > hi + self.diag_offset:
                return True
        return False

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Scaled scores of rows ``[i0, i1)`` and keys ``[j0, j1)``, masked entries = -inf.

        Returns a fresh ``(N, Hq, i1 - i0, j1 - j0)`` tensor in the compute dtype.
        """
        n, hkv, g, _, d = self.q.shape
        bi, bj = i1 - i0, j1 - j0
        qt = self.q[:, :, :, i0:i1].reshape(n, hkv, g * bi, d)
        s = torch.matmul(qt, self.k[:, :, j0:j1].transpose(-1, -2)).view(n, self.hq, bi, bj)
        lo, hi = self.pos_range(i0, i1)
        need_causal = self.causal_offset is not None and j1 - 1 > lo + self.causal_offset
        need_window = self.window is not None and (
            j0 <= hi + self.diag_offset - self.window
            or (not self.window_causal and j1 - 1 >= lo + self.diag_offset + self.window)
            or (self.window_causal and j1 - 1 > lo + self.diag_offset)
        )
        if need_causal or need_window:
            pos = self._positions(i0, i1)[:, None]
            cols = torch.arange(j0, j1, device=s.device)[None, :]
            allowed = torch.ones((bi, bj), dtype=torch.bool, device=s.device)
            if need_causal:
                assert self.causal_offset is not None
                allowed &= cols <= pos + self.causal_offset
            if need_window:
                assert self.window is not None
                centre = pos + self.diag_offset
                allowed &= cols > centre - self.window
                if self.window_causal:
                    allowed &= cols <= centre
                else:
                    allowed &= cols < centre + self.window
            s.masked_fill_(~allowed, float("-inf"))
        if self.mask is not None:
            mt = self.mask[..., j0:j1]
            if self.row_pos is None:
                mt = mt[..., i0:i1, :]
            else:
                mt = mt.index_select(-2, self.row_pos[i0:i1])
            mt = mt.reshape(n, self.hq, bi, bj)
            if mt.dtype == torch.bool:
                s.masked_fill_(~mt, float("-inf"))
            else:
                s.add_(mt.to(s.dtype))
        return s

    def _positions(self, i0: int, i1: int) -> torch.Tensor:
        if self.row_pos is None:
            return torch.arange(i0, i1, device=self.q.device)
        return self.row_pos[i0:i1]

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, Hq, ...)`` → ``(*B, Hq, ...)``."""
        return x.reshape(*self.batch_shape, *x.shape[2:])


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def choose_blocks(
    n_heads: int, rows: int, sk: int, block_q: int | None, block_k: int | None
) -> tuple[int, int]:
    """Tile sizes so that one ``(n_heads, block_q, block_k)`` tile holds ≈ ``_TILE_ELEMENTS``."""
    target = max(_TILE_ELEMENTS // max(n_heads, 1), 256)
    if block_q is None:
        bq = _pow2_floor(math.sqrt(target))
        if block_k is not None:
            bq = _pow2_floor(target / block_k)
        block_q = max(16, bq)
    if block_k is None:
        block_k = max(16, _pow2_floor(target / block_q))
    return max(1, min(block_q, rows)), max(1, min(block_k, sk))


def prepare(
    q: Any,
    k: Any,
    *,
    scale: float | None,
    causal: bool | str,
    mask: Any,
    rows: torch.Tensor | None = None,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> AttentionProblem:
    """Validate ``q``, ``k`` (+ options) and build the flattened problem.

    ``q``: ``(*B, Hq, Sq, D)``, ``k``: ``(*B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (grouped-query
    attention: query head ``h`` reads key head ``h // (Hq // Hkv)``, as SDPA's ``enable_gqa``).
    Two-dimensional ``(S, D)`` inputs are treated as one head.
    """
    q = check_tensor(q, "q", min_ndim=2)
    k = check_tensor(k, "k", min_ndim=2)
    if q.ndim != k.ndim:
        raise ValueError(
            f"`q` and `k` must have the same number of dimensions, got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    if q.device != k.device:
        raise ValueError(f"`q` is on {q.device} but `k` is on {k.device}; move them together")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"`q` and `k` must share head_dim (last dim), got {q.shape[-1]} and {k.shape[-1]}"
        )
    if q.ndim == 2:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        squeeze_head = True
    else:
        squeeze_head = False
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(
            f"`q` and `k` batch dims differ: {tuple(q.shape[:-3])} vs {tuple(k.shape[:-3])}"
        )
    hq, sq, d = q.shape[-3:]
    hkv, sk = k.shape[-3], k.shape[-2]
    if hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key heads ({hkv}) for grouped-query "
            "attention; check the head dimension (-3) of `q` and `k`"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = check_float(scale, "scale", positive=True)
    if isinstance(causal, str):
        check_choice(causal, "causal", ("bottom_right", "top_left"))
    elif not isinstance(causal, bool):
        raise TypeError(
            f"`causal` must be a bool, 'bottom_right' or 'top_left', got {type(causal).__name__}"
        )
    diag_offset = 0 if causal == "top_left" else sk - sq

    lead = tuple(q.shape[:-3])
    batch_shape = (*lead, hq)
    n = math.prod(lead) if lead else 1
    g = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 and k.dtype == torch.float64 else torch.float32
    qf = q.reshape(n, hkv, g, sq, d).to(cdt) * scale
    kf = k.reshape(n, hkv, sk, d).to(cdt)

    mask_view = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`mask` must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"`mask` must be boolean (True = may attend) or a float additive mask, got "
                f"{mask.dtype}"
            )
        if mask.device != q.device:
            raise ValueError(f"`mask` is on {mask.device} but `q` is on {q.device}")
        if mask.is_floating_point() and (
            bool(torch.isnan(mask).any()) or bool(torch.isposinf(mask).any())
        ):
            raise ValueError("`mask` contains NaN or +Inf; use -inf for blocked positions")
        full = (*batch_shape, sq, sk)
        try:
            if torch.broadcast_shapes(mask.shape, full) != torch.Size(full):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"`mask` of shape {tuple(mask.shape)} does not broadcast to the score shape "
                f"{full} (batch..., heads, Sq, Sk)"
            ) from None
        mask_view = mask.expand(full)

    row_pos = row_pos_host = None
    if rows is not None:
        row_pos_host = [int(r) for r in rows.tolist()]
        row_pos = rows.to(device=q.device, dtype=torch.long)
        qf = qf.index_select(3, row_pos)
    n_rows = qf.shape[3]
    if block_q is not None:
        block_q = check_int(block_q, "block_q", minimum=1)
    if block_k is not None:
        block_k = check_int(block_k, "block_k", minimum=1)
    bq, bk = choose_blocks(n * hq, n_rows, sk, block_q, block_k)
    if window is not None:
        window = check_int(window, "window", minimum=1)
    return AttentionProblem(
        q=qf,
        k=kf,
        batch_shape=batch_shape if not squeeze_head else (),
        sq=sq,
        row_pos=row_pos,
        row_pos_host=row_pos_host,
        mask=mask_view,
        causal_offset=diag_offset if causal is not False else None,
        window=window,
        window_causal=causal is not False,
        diag_offset=diag_offset,
        block_q=bq,
        block_k=bk,
    )


@dataclass
class StreamStats:
    """Per-row results of the streaming pass, shaped ``(N, Hq, R)``."""

    lse: torch.Tensor  # log Σ_j e^{s_ij}; -inf for rows with no attended key
    entropy: torch.Tensor  # Shannon entropy in nats; 0 for rows with no attended key
    count: torch.Tensor | None  # number of attended keys (when requested)


def stream_stats(p: AttentionProblem, *, want_count: bool = False) -> StreamStats:
    """One blockwise pass over all tiles computing row log-sum-exp and entropy (see module doc)."""
    shape = (p.n, p.hq, p.rows)
    dev, cdt = p.q.device, p.q.dtype
    lse = torch.empty(shape, dtype=cdt, device=dev)
    ent = torch.empty(shape, dtype=cdt, device=dev)
    count = torch.zeros(shape, dtype=torch.long, device=dev) if want_count else None
    ninf = float("-inf")
    for i0 in range(0, p.rows, p.block_q):
        i1 = min(i0 + p.block_q, p.rows)
        m = torch.full((p.n, p.hq, i1 - i0), ninf, dtype=cdt, device=dev)
        l_sum = torch.zeros_like(m)
        t_sum = torch.zeros_like(m)
        for j0 in range(0, p.sk, p.block_k):
            j1 = min(j0 + p.block_k, p.sk)
            if p.tile_empty(i0, i1, j0, j1):
                continue
            s = p.scores(i0, i1, j0, j1)
            if count is not None:
                count[..., i0:i1] += torch.isfinite(s).sum(-1)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            shift = m - m_safe  # <= 0, -inf where nothing was seen yet
            alpha = torch.exp(shift)
            t_sum = alpha * (t_sum + torch.where(l_sum > 0, shift * l_sum, 0.0))
            s.sub_(m_safe.unsqueeze(-1))  # s - m' (-inf stays -inf)
            e = torch.exp(s)
            t_sum += torch.where(e > 0, e * s, 0.0).sum(-1)
            l_sum = alpha * l_sum + e.sum(-1)
            m = m_new
            del s, e
        alive = l_sum > 0
        safe_l = torch.where(alive, l_sum, 1.0)
        lse[..., i0:i1] = torch.where(alive, m + torch.log(safe_l), ninf)
        ent[..., i0:i1] = torch.where(alive, torch.log(safe_l) - t_sum / safe_l, 0.0)
    return StreamStats(lse=lse, entropy=ent.clamp_min_(0.0), count=count)


def key_counts(p: AttentionProblem) -> torch.Tensor:
    """Number of attended keys per row, ``(N, Hq, R)``, from causality and window (no mask)."""
    assert p.mask is None, "with a mask, count keys in the streaming pass (want_count=True)"
    pos = p.row_pos if p.row_pos is not None else torch.arange(p.rows, device=p.q.device)
    hi = torch.full_like(pos, p.sk)  # exclusive upper bound
    lo = torch.zeros_like(pos)
    if p.causal_offset is not None:
        hi = torch.minimum(hi, pos + p.causal_offset + 1)
    if p.window is not None:
        centre = pos + p.diag_offset
        lo = torch.maximum(lo, centre - p.window + 1)
        hi = torch.minimum(hi, centre + 1 if p.window_causal else centre + p.window)
    c = (hi - lo).clamp_min(0)
    return c.expand(p.n, p.hq, p.rows)
