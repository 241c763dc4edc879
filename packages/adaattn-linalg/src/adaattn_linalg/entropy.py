"""Attention entropy: dense, streamed, sampled with a confidence interval, and multi-scale.

Entropy can be taken of dense probabilities or logits, streamed from ``q``/``k`` without forming
the scores, estimated from a sample of query rows, or compared between a local window and all keys.

The Shannon entropy of an attention row ``p_i = softmax(s_i)`` is (Shannon 1948, "A Mathematical
Theory of Communication", Theorem 2)

    H_i = -Σ_j p_ij log p_ij = logsumexp(s_i) - Σ_j p_ij s_ij,

in nats. The normalised entropy divides by ``log n_i`` where ``n_i`` is the number of keys the row
may attend to, so that 1 means uniform attention and 0 one-hot attention (Vig & Belinkov 2019 use
this normalised form to compare heads). Masked entries (``-inf`` logits, ``False`` in a boolean
mask) are excluded; a row with no attended key has entropy 0 (never NaN).

The streaming form keeps, per query row, the running max ``m``, ``l = Σ e^{s-m}`` and
``t = Σ e^{s-m}(s - m)`` over key blocks (online softmax, Milakov & Gimelshein 2018, Algorithm 3;
FlashAttention, Dao et al. 2022, Alg. 1) and returns ``H = log l - t/l``, i.e. ``log l + m - Σ
e^{s-m} s / l`` rewritten to avoid cancellation. Memory is O(seq · head_dim) plus one score tile.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

import torch

from adaattn_linalg import _attention
from adaattn_linalg._validation import (
    check_float,
    check_int,
    check_no_nan,
    check_tensor,
    compute_dtype,
    make_generator,
)

__all__ = [
    "MultiScaleEntropy",
    "SampledEntropy",
    "entropy",
    "entropy_from_logits",
    "multiscale_entropy",
    "sampled_entropy",
    "streaming_entropy",
]

# |Σ p - 1| allowed for probability rows, per input dtype (rounding of a softmax in that dtype).
_SUM_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _check_dim(x: torch.Tensor, dim: int) -> int:
    dim = check_int(dim, "dim", minimum=-x.ndim, maximum=x.ndim - 1)
    return dim % x.ndim


def _check_mask_for(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("`mask` must be a boolean tensor (True = may attend) or None")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"`mask` of shape {tuple(mask.shape)} does not broadcast to `{name}` of shape "
            f"{tuple(x.shape)}"
        )
    return mask.to(x.device)


def _normalise(h: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``h / log(count)``; rows with ``count <= 1`` (one or no key) give 0."""
    log_n = torch.log(count.to(h.dtype).clamp_min(1.0))
    return torch.where(count > 1, h / torch.where(count > 1, log_n, 1.0), 0.0)


def entropy(
    probs: torch.Tensor,
    *,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Shannon entropy ``H = -Σ p log p`` (nats) of probability vectors along ``dim``.

    Shannon (1948), Theorem 2; ``0 log 0 = 0``. Rows must be non-negative and sum to 1 (within the
    rounding of their dtype) or be all zero (a fully masked row, entropy 0).

    Args:
        probs: Probabilities, any shape; float16/bfloat16 are computed in float32.
        dim: Dimension holding each distribution.
        mask: Optional boolean mask broadcastable to ``probs`` (True = may attend). Masked entries
            are ignored and do not count towards the normalisation.
        normalize: Divide by ``log n`` with ``n`` the number of attended entries (1 = uniform,
            0 = one-hot; rows with ``n <= 1`` give 0).

    Returns:
        Entropy with ``dim`` removed, float32 (float64 for float64 input).

    Raises:
        TypeError: ``probs`` is not a floating tensor, or ``mask`` is not boolean.
        ValueError: empty input, NaN/Inf, negative entries, rows not summing to 1, or a mask that
            does not broadcast.
    """
    probs = check_tensor(probs, "probs", min_ndim=1)
    dim = _check_dim(probs, dim)
    mask = _check_mask_for(probs, mask, "probs")
    p = probs.to(compute_dtype(probs.dtype))
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    if bool((p < 0).any()):
        raise ValueError("`probs` has negative entries; pass probabilities (e.g. a softmax)")
    sums = p.sum(dim)
    bad = ((sums - 1).abs() > _SUM_TOL[probs.dtype]) & (sums != 0)
    if bool(bad.any()):
        worst = float((sums - 1).abs().masked_fill(~bad, 0).max())
        raise ValueError(
            f"rows of `probs` along dim {dim} must sum to 1 (or be all zero); the worst row is off "
            f"by {worst:.3g}. Use `entropy_from_logits` for unnormalised scores"
        )
    h = -torch.special.xlogy(p, p).sum(dim)
    if normalize:
        if mask is None:
            count = torch.full_like(h, probs.shape[dim])
        else:
            count = mask.expand(probs.shape).sum(dim)
        h = _normalise(h, count)
    return h


def entropy_from_logits(
    logits: torch.Tensor,
    *,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along ``dim``, computed stably via logsumexp.

    ``H = L - Σ_j p_j s_j`` with ``L = logsumexp(s)`` and ``p = e^{s - L}`` (Shannon 1948,
    Theorem 2, applied to a softmax), evaluated as ``-Σ_j p_j (s_j - L)`` so that large logits do
    not cancel. ``-inf`` logits are masked keys; rows whose keys are all masked give 0, not NaN.

    Args:
        logits: Scores, any shape; float16/bfloat16 are computed in float32. ``-inf`` allowed.
        dim: Dimension holding each row.
        mask: Optional boolean mask broadcastable to ``logits`` (True = may attend).
        normalize: Divide by ``log n`` with ``n`` the number of attended (finite, unmasked)
            entries; rows with ``n <= 1`` give 0.

    Returns:
        Entropy with ``dim`` removed, float32 (float64 for float64 input).

    Raises:
        TypeError: ``logits`` is not a floating tensor, or ``mask`` is not boolean.
        ValueError: empty input, NaN or +Inf entries, or a mask that does not broadcast.
    """
    logits = check_tensor(logits, "logits", min_ndim=1, finite=False)
    check_no_nan(logits, "logits")
    dim = _check_dim(logits, dim)
    mask = _check_mask_for(logits, mask, "logits")
    s = logits.to(compute_dtype(logits.dtype))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim, keepdim=True)
    alive = torch.isfinite(lse)
    centred = s - torch.where(alive, lse, 0.0)
    p = torch.exp(centred)
    h = -torch.where(p > 0, p * centred, 0.0).sum(dim)
    h = torch.where(alive.squeeze(dim), h.clamp_min(0.0), 0.0)
    if normalize:
        h = _normalise(h, torch.isfinite(s).sum(dim))
    return h


def _finish(p: _attention.AttentionProblem, normalize: bool) -> torch.Tensor:
    stats = _attention.stream_stats(p, want_count=normalize and p.mask is not None)
    h = stats.entropy
    if normalize:
        count = stats.count if stats.count is not None else _attention.key_counts(p)
        h = _normalise(h, count)
    return h


def streaming_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool | str = False,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Per-row entropy of ``softmax(q kᵀ · scale)`` without materialising the scores.

    Blockwise online log-sum-exp (Milakov & Gimelshein 2018, Algorithm 3; Dao et al. 2022,
    Alg. 1) extended with ``t = Σ e^{s-m}(s-m)`` so that ``H = log l - t / l`` (see module doc).
    Memory is O(seq · head_dim) plus one ``block_q × block_k`` tile per head: seq 65,536 at
    head_dim 128 fits one GPU, seq 8,192 fits a CPU in well under a few GB.

    Args:
        q: Queries ``(*B, Hq, Sq, D)`` (or ``(Sq, D)``); float16/bfloat16 run in float32.
        k: Keys ``(*B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (grouped-query attention: query head
            ``h`` reads key head ``h // (Hq // Hkv)``).
        scale: Score scale, default ``1/√D``.
        causal: ``False`` (default); ``True`` or ``"bottom_right"``: query ``i`` may see keys
            ``j ≤ i + Sk - Sq`` (FlashAttention ≥ 2.1, ``causal_lower_right``, and
            ``adaattn_kernels.attention``); ``"top_left"``: keys ``j ≤ i``, what
            ``scaled_dot_product_attention(is_causal=True)`` does. Same when ``Sq == Sk``.
        mask: Boolean (True = may attend) or additive float mask broadcastable to
            ``(*B, Hq, Sq, Sk)``.
        normalize: Divide by ``log n_i`` (``n_i`` = attended keys of row ``i``).
        block_q: Query rows per tile (default from the problem size).
        block_k: Keys per tile (default from the problem size).

    Returns:
        ``(*B, Hq, Sq)`` entropies in nats, float32 (float64 for float64 inputs). Rows with no
        attended key give 0.

    Raises:
        TypeError: non-floating ``q``/``k``, a ``causal`` of the wrong type, bad ``mask`` dtype.
        ValueError: mismatched shapes/devices, ``Hq`` not a multiple of ``Hkv``, non-finite or
            empty inputs, a mask that does not broadcast, bad block sizes.
    """
    p = _attention.prepare(
        q,
        k,
        scale=scale,
        causal=causal,
        mask=mask,
        block_q=block_q,
        block_k=block_k,
    )
    return p.unflatten(_finish(p, normalize))


@dataclass(frozen=True)
class SampledEntropy:
    """Entropy of a random subset of query rows, with a confidence interval per head.

    Attributes:
        mean: Mean entropy of the sampled rows, ``(*B, Hq)``: an unbiased estimate of the mean
            row entropy over all ``Sq`` rows.
        std_error: Standard error of ``mean`` (sample std / √m, times the finite-population
            correction √((Sq - m)/(Sq - 1)) because rows are drawn without replacement).
        low: Lower end of the ``confidence`` normal-approximation interval.
        high: Upper end of the interval.
        rows: The sampled row indices ``(m,)`` (sorted, shared by all heads and batch entries).
        values: Entropy of each sampled row, ``(*B, Hq, m)``.
        confidence: Confidence level of ``[low, high]``.
    """

    mean: torch.Tensor
    std_error: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor
    confidence: float


def sampled_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_samples: int,
    scale: float | None = None,
    causal: bool | str = False,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
    confidence: float = 0.95,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> SampledEntropy:
    """Mean row entropy per head from ``num_samples`` query rows, with a confidence interval.

    Draws ``m = num_samples`` rows uniformly without replacement (the same rows for every head),
    computes their exact entropies against all keys with the streaming pass of
    :func:`streaming_entropy` (cost O(m · Sk · D)), and reports the sample mean with the
    normal-approximation interval ``mean ± z_{(1+c)/2} · σ̂/√m · √((Sq - m)/(Sq - 1))``
    (Cochran 1977, *Sampling Techniques*, Theorem 2.2 and §2.11). When ``m >= Sq`` every row is
    used and the interval has zero width. This is the measurement the ``adaattn`` planner uses.

    Args:
        q: Queries ``(*B, Hq, Sq, D)`` (see :func:`streaming_entropy`).
        k: Keys ``(*B, Hkv, Sk, D)``.
        num_samples: Rows to sample, at least 2.
        scale: Score scale, default ``1/√D``.
        causal: ``False``, ``True``/``"bottom_right"`` or ``"top_left"`` (see
            :func:`streaming_entropy`).
        mask: Boolean or additive mask broadcastable to ``(*B, Hq, Sq, Sk)``.
        normalize: Use normalised entropy ``H / log n_i``.
        confidence: Interval level in (0, 1).
        seed: Seed for the row sample (exclusive with ``generator``).
        generator: Generator for the row sample.

    Returns:
        A :class:`SampledEntropy`.

    Raises:
        TypeError, ValueError: as :func:`streaming_entropy`, plus ``num_samples < 2`` and
            ``confidence`` outside (0, 1).
    """
    num_samples = check_int(num_samples, "num_samples", minimum=2)
    confidence = check_float(confidence, "confidence", open_unit=True)
    q = check_tensor(q, "q", min_ndim=2, finite=False)
    sq = q.shape[-2]
    gen = make_generator(seed, generator, torch.device("cpu"))
    m = min(num_samples, sq)
    if m == sq:
        rows = torch.arange(sq)
    else:
        draw_dev = gen.device if gen is not None else torch.device("cpu")
        rows = torch.randperm(sq, generator=gen, device=draw_dev)[:m].sort().values.cpu()
    p = _attention.prepare(q, k, scale=scale, causal=causal, mask=mask, rows=rows)
    values = _finish(p, normalize)  # (N, Hq, m)
    mean = values.mean(-1)
    if m == sq:
        se = torch.zeros_like(mean)
    else:
        fpc = math.sqrt((sq - m) / (sq - 1))
        se = values.std(-1, correction=1) / math.sqrt(m) * fpc
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    unflat = p.unflatten
    return SampledEntropy(
        mean=unflat(mean.unsqueeze(-1)).squeeze(-1),
        std_error=unflat(se.unsqueeze(-1)).squeeze(-1),
        low=unflat((mean - z * se).unsqueeze(-1)).squeeze(-1),
        high=unflat((mean + z * se).unsqueeze(-1)).squeeze(-1),
        rows=rows.to(q.device),
        values=unflat(values),
        confidence=confidence,
    )


@dataclass(frozen=True)
class MultiScaleEntropy:
    """Local-window vs global entropy of every query row, and their spread across rows.

    Attributes:
        local_entropy: ``(*B, Hq, Sq)`` entropy of each row's softmax restricted to its window.
        global_entropy: ``(*B, Hq, Sq)`` entropy of each row's full softmax.
        local_mean: ``(*B, Hq)`` mean of ``local_entropy`` over rows with at least one key.
        global_mean: ``(*B, Hq)`` mean of ``global_entropy`` over rows with at least one key.
        local_variance: ``(*B, Hq)`` population variance of ``local_entropy`` across those rows.
        global_variance: ``(*B, Hq)`` population variance of ``global_entropy`` across rows.
        window: The window size used.
    """

    local_entropy: torch.Tensor
    global_entropy: torch.Tensor
    local_mean: torch.Tensor
    global_mean: torch.Tensor
    local_variance: torch.Tensor
    global_variance: torch.Tensor
    window: int


def _masked_mean_var(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = valid.to(x.dtype)
    n = w.sum(-1).clamp_min(1.0)
    mean = (x * w).sum(-1) / n
    var = (((x - mean.unsqueeze(-1)) ** 2) * w).sum(-1) / n
    return mean, var


def multiscale_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int,
    scale: float | None = None,
    causal: bool | str = False,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
) -> MultiScaleEntropy:
    """Entropy inside a local window vs over all keys, per row and per head.

    Row ``i`` has diagonal key ``c_i = i + (Sk - Sq)`` (``c_i = i`` when ``causal="top_left"``).
    The local distribution is the softmax restricted to keys ``j`` with ``c_i - window < j ≤ c_i``
    when causal and ``|j - c_i| < window`` otherwise (a sliding window, as in Longformer, Beltagy
    et al. 2020, §3.1), intersected with ``mask``. Both
    entropies come from the streaming pass of :func:`streaming_entropy`; the local pass only
    visits tiles that meet the band. A head whose local entropy is close to its global entropy
    keeps its mass near the diagonal (a candidate for a low-rank far field).

    Args:
        q: Queries ``(*B, Hq, Sq, D)``.
        k: Keys ``(*B, Hkv, Sk, D)``.
        window: Window size (keys on each side; at least 1).
        scale: Score scale, default ``1/√D``.
        causal: ``False``, ``True``/``"bottom_right"`` or ``"top_left"`` (see
            :func:`streaming_entropy`).
        mask: Boolean or additive mask broadcastable to ``(*B, Hq, Sq, Sk)``.
        normalize: Normalise each entropy by ``log`` of its own number of attended keys.
        block_q: Query rows per tile.
        block_k: Keys per tile.

    Returns:
        A :class:`MultiScaleEntropy`.

    Raises:
        TypeError, ValueError: as :func:`streaming_entropy`, plus ``window < 1``.
    """
    window = check_int(window, "window", minimum=1)
    pg = _attention.prepare(
        q,
        k,
        scale=scale,
        causal=causal,
        mask=mask,
        block_q=block_q,
        block_k=block_k,
    )
    pl = dataclasses.replace(pg, window=window)
    sg = _attention.stream_stats(pg, want_count=pg.mask is not None)
    sl = _attention.stream_stats(pl, want_count=pl.mask is not None)
    cg = sg.count if sg.count is not None else _attention.key_counts(pg)
    cl = sl.count if sl.count is not None else _attention.key_counts(pl)
    hg, hl = sg.entropy, sl.entropy
    if normalize:
        hg, hl = _normalise(hg, cg), _normalise(hl, cl)
    gm, gv = _masked_mean_var(hg, cg > 0)
    lm, lv = _masked_mean_var(hl, cl > 0)

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return pg.unflatten(x.unsqueeze(-1)).squeeze(-1)

    return MultiScaleEntropy(
        local_entropy=pg.unflatten(hl),
        global_entropy=pg.unflatten(hg),
        local_mean=per_head(lm),
        global_mean=per_head(gm),
        local_variance=per_head(lv),
        global_variance=per_head(gv),
        window=window,
    )
