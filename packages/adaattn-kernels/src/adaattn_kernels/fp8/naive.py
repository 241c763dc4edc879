"""Plain-PyTorch reference of low-precision attention: the kernel's quantisation, simulated.

:func:`fp8_attention_reference` computes what the Triton kernel computes, step by step, with
``torch.float8_e4m3fn`` casts or :func:`quantize_int8` doing the rounding and float32 doing the
arithmetic:

1. K smoothing: ``K̃ = K − mean_s K`` (float32 mean over the keys). Softmax is invariant to a
   per-row constant, and ``q·(k − μ) = q·k − q·μ`` shifts row ``i`` by ``q_i·μ`` only, so the
   output is unchanged; the log-sum-exp gets ``τ q_i·μ`` added back (SageAttention, Zhang et
   al. 2024, arXiv 2410.02367, Sec. 3.2).
2. ``qk_dtype="int8"`` (default): ``(Q8, s_q) = quantize_int8(Q)``, ``(K8, s_k) =
   quantize_int8(K̃)`` — symmetric int8, ``s = amax / 127`` per block of ``block_size`` tokens
   or per token, round half to even, clamp to ±127 (SageAttention's INT8 ``Q·Kᵀ``, Sec. 3.3:
   rounding step ``amax/127``, about 1 % score noise on N(0, 1) inputs instead of e4m3's 3.6 %).
   ``qk_dtype="fp8"``: the same with :func:`adaattn_precision.quantize_fp8` (e4m3,
   ``s = amax/448``). For FP8 ``P·V``: ``(V8ᵀ, s_v) = quantize_fp8(Vᵀ, granularity="token")``,
   i.e. one scale per channel of V.
3. Scores in base 2: ``S = (Q8 K8ᵀ) s_q s_kᵀ τ log2 e``. For int8 the product of integers is
   exact in float32 (``|Σ| ≤ 127² · D < 2²⁴`` for ``D ≤ 1040``), as the kernel's int32
   accumulator is; the scales multiply it in the kernel's order.
4. The online softmax of FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithm 1) replayed
   over key tiles of ``tile_n`` keys — the kernel's tiles — because the running maximum ``m``
   at each tile fixes how the probabilities are rounded:
   ``P' = 2^(S − m + 8)`` (in ``[0, 256]``), ``l ← l·α + Σ P'``,
   ``acc ← acc·α + fp8(P') · V8`` (or ``P'`` and ``V`` in the input's 16-bit dtype).
5. ``O = acc · s_v / l``; ``lse = ln 2 · (m + log2 l − 8) + τ q·mean(K)``.

With ``outlier_channels=n`` the ``n`` channels chosen by
:func:`~adaattn_kernels.fp8.quant.select_outlier_channels` are taken out of Q and K̃ before
step 2 and their part of the scores, ``Q_hi · K̃_hiᵀ`` with both operands in the 16-bit input
dtype and a float32 product, is added to ``S`` in step 3 (times ``τ log2 e``).

The function also evaluates only selected query rows (``rows=``), which is what the planner
needs to measure a head's FP8 error cheaply: :func:`fp8_attention_error`.
"""

from __future__ import annotations

import math

import torch
from adaattn_precision import dequantize_fp8, quantize_fp8

from adaattn_kernels._ratio import check_confidence, relative_error_from_rows
from adaattn_kernels._validation import (
    CausalArg,
    causal_offset,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.fp8.quant import OUTLIER_CHANNELS, kernel_tile_n, select_outlier_channels

__all__ = [
    "PV_DTYPES",
    "QK_DTYPES",
    "fp8_attention_error",
    "fp8_attention_reference",
    "quantize_int8",
]

#: Accepted values of ``pv_dtype``.
PV_DTYPES = ("fp8", "fp16")
#: Accepted values of ``qk_dtype`` (the first is the default).
QK_DTYPES = ("int8", "fp8")
#: Largest int8 code used (symmetric: -128 is never produced).
INT8_MAX = 127.0
#: Accepted values of ``granularity`` (scale groups of Q and K; the first is the default).
ATTENTION_GRANULARITIES = ("block", "q_token", "token")
_LN2 = math.log(2.0)
_P_SHIFT = 8.0
_REF_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_fp8_options(
    pv_dtype: str,
    granularity: str,
    block_size: int,
    qk_dtype: str = "int8",
    outlier_channels: int = 0,
    head_dim: int | None = None,
) -> None:
    """Validate the low-precision options shared by the kernel and the reference."""
    if isinstance(outlier_channels, bool) or not isinstance(outlier_channels, int):
        raise TypeError(f"`outlier_channels` must be an int, got {type(outlier_channels).__name__}")
    if outlier_channels not in OUTLIER_CHANNELS:
        raise ValueError(
            f"`outlier_channels` must be one of {OUTLIER_CHANNELS} (channels of Q·Kᵀ kept in "
            f"16-bit), got {outlier_channels}"
        )
    if head_dim is not None and outlier_channels and 2 * outlier_channels > head_dim:
        raise ValueError(
            f"`outlier_channels`={outlier_channels} is more than half of head_dim {head_dim}; "
            "use fewer, or adaattn_kernels.attention (all channels in 16-bit)"
        )
    if qk_dtype not in QK_DTYPES:
        raise ValueError(
            f"`qk_dtype` must be 'int8' (Q·Kᵀ in int8, ≈1 % score noise) or 'fp8' (e4m3, "
            f"≈3.6 %), got {qk_dtype!r}"
        )
    if pv_dtype not in PV_DTYPES:
        raise ValueError(
            f"`pv_dtype` must be 'fp8' (P and V in e4m3) or 'fp16' (P·V in the 16-bit input "
            f"dtype), got {pv_dtype!r}"
        )
    if granularity not in ATTENTION_GRANULARITIES:
        raise ValueError(
            f"`granularity` must be 'block', 'q_token' (per-token Q, per-block K) or 'token', "
            f"got {granularity!r}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"`block_size` must be an int, got {type(block_size).__name__}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"`block_size` must be in [1, {MAX_BLOCK_SIZE}] tokens, got {block_size}")


#: Largest scale group (tokens) the FP8 attention op takes.
MAX_BLOCK_SIZE = 4096


def _group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    """Max |x| over groups of ``group`` consecutive tokens: ``(..., S, D)`` → ``(..., n)``."""
    s = x.shape[-2]
    n = -(-s // group)
    xp = torch.nn.functional.pad(x.abs(), (0, 0, 0, n * group - s))
    return xp.reshape(*x.shape[:-2], n, group * x.shape[-1]).amax(dim=-1)


def quantize_int8(
    x: torch.Tensor, *, granularity: str = "block", block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of ``x`` ``(..., S, D)`` with one scale per token group.

    The contract of the int8 ``Q·Kᵀ`` of :func:`~adaattn_kernels.fp8.fp8_attention` (the Triton
    quantisation, :func:`~adaattn_kernels.fp8.quantize_int8_triton`, is bit-exact with it):
    per group of ``block_size`` tokens (``"block"``) or per token (``"token"``),
    ``scale = amax / 127`` (an IEEE float32 division; 1 for an all-zero group, at least the
    smallest normal float32) and ``xq = round_half_even(clamp(x / scale, ±127))`` — the
    scheme of SageAttention (Zhang et al. 2024, arXiv 2410.02367, Sec. 3.3, per-block INT8).

    Args:
        x: float16/bfloat16/float32 tensor with at least 2 dims, finite (not checked).
        granularity: ``"block"`` or ``"token"``.
        block_size: Tokens per group for ``"block"`` (≥ 1).

    Returns:
        ``(xq, scale)``: int8 ``xq`` of ``x``'s shape and float32 ``scale`` of shape
        ``(..., ceil(S / block_size))`` (``"block"``) or ``(..., S)`` (``"token"``).

    Raises:
        ValueError: bad ``granularity``/``block_size`` or ``x`` with fewer than 2 dims.
    """
    if granularity not in ("block", "token"):
        raise ValueError(f"`granularity` must be 'block' or 'token', got {granularity!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("`x` must be a tensor of shape (..., S, D)")
    group = 1 if granularity == "token" else block_size
    xf = x.to(torch.float32)
    amax = _group_amax(xf, group)
    # Divide by a tensor, not a Python scalar: CUDA turns division by a scalar into a
    # multiplication by its reciprocal, which is not the IEEE quotient (1 ulp off, seen on H100).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, INT8_MAX), torch.ones_like(amax))
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    per_token = scale.repeat_interleave(group, dim=-1)[..., : x.shape[-2]]
    xq = torch.round(torch.clamp(xf / per_token.unsqueeze(-1), -INT8_MAX, INT8_MAX))
    return xq.to(torch.int8), scale


def split_granularity(granularity: str) -> tuple[str, str]:
    """``(granularity of Q, granularity of K)``, each ``"block"`` or ``"token"``."""
    if granularity == "q_token":
        return "token", "block"
    return granularity, granularity


def _check_rows(rows: torch.Tensor | None, seq_q: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(seq_q, device=device)
    if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64):
        raise TypeError("`rows` must be a 1-D integer tensor of query indices (or None for all)")
    if rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(f"`rows` must be a non-empty 1-D tensor, got shape {tuple(rows.shape)}")
    rows = rows.to(device=device, dtype=torch.int64)
    if int(rows.min()) < 0 or int(rows.max()) >= seq_q:
        raise ValueError(f"`rows` must hold query indices in [0, {seq_q}), got values outside")
    return rows


def _simulate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    mode: int,
    scale: float,
    pv_dtype: str,
    granularity: str,
    block_size: int,
    tile_n: int,
    qk_dtype: str = "int8",
    outlier_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated core of :func:`fp8_attention_reference`; ``rows`` is an int64 index tensor."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = block_size
    q_gran, k_gran = split_granularity(granularity)
    mu = torch.mean(k, dim=-2, dtype=torch.float32)  # (B, Hkv, D); the op uses the same call
    q_group = 1 if q_gran == "token" else bs
    k_group = 1 if k_gran == "token" else bs
    qk_scale = scale / _LN2  # τ · log2(e)
    r = rows.numel()
    q_in, k_in = q, k
    q_hi_rows = None
    if outlier_channels:
        # The op's order of operations: K's outlier channels are set to the (rounded) mean
        # before smoothing, Q's to 0; their products come from the 16-bit copies.
        idx, hit = select_outlier_channels(q, k, mu, outlier_channels)
        k_in = torch.where(hit.unsqueeze(-2), mu.to(k.dtype).unsqueeze(-2), k)
        q_in = q.masked_fill(hit.repeat_interleave(g, dim=1).unsqueeze(-2), 0.0)
        q_hi = torch.gather(q, -1, idx.repeat_interleave(g, dim=1)[:, :, None, :].expand(
            b, hq, sq, outlier_channels))  # fmt: skip
        k_hi = torch.gather(k.to(torch.float32) - mu.unsqueeze(-2), -1,
                            idx[:, :, None, :].expand(b, hkv, sk, outlier_channels))  # fmt: skip
        k_hi = k_hi.to(k.dtype).to(torch.float32)
        q_hi_rows = q_hi[:, :, rows].to(torch.float32).reshape(b, hkv, g, r, outlier_channels)
    if qk_dtype == "int8":
        q8, qs = quantize_int8(q_in, granularity=q_gran, block_size=bs)
        k8, ks = quantize_int8(k_in.to(torch.float32) - mu.unsqueeze(-2), granularity=k_gran,
                               block_size=bs)  # fmt: skip
        # Integer operands in float32: their products and sums are exact (|Σ| < 2²⁴), like the
        # kernel's int32 accumulator; the scales are applied to the product, as in the kernel.
        qd = q8.to(torch.float32)[:, :, rows]
        kd = k8.to(torch.float32)
        row_f = qs.repeat_interleave(q_group, dim=-1)[..., :sq][:, :, rows] * qk_scale
        col_f = ks.repeat_interleave(k_group, dim=-1)[..., :sk]  # (B, Hkv, Sk)
    else:
        q8f, qsf = quantize_fp8(q_in, granularity=q_gran, block_size=bs)
        k8f, ksf = quantize_fp8(k_in.to(torch.float32) - mu.unsqueeze(-2), granularity=k_gran,
                                block_size=bs)  # fmt: skip
        # Dequantised operands (e4m3 value × float32 scale, rounded once to float32) differ
        # from the kernel's order (scales applied to the fp32 product Q8·K8ᵀ) by float32
        # rounding only.
        qd = dequantize_fp8(q8f, qsf, granularity=q_gran, block_size=bs)[:, :, rows]
        kd = dequantize_fp8(k8f, ksf, granularity=k_gran, block_size=bs)
        row_f = torch.full((b, hq, r), qk_scale, device=q.device)
        col_f = torch.ones((b, hkv, sk), device=q.device)
    row_f = row_f.reshape(b, hkv, g, r)
    if pv_dtype == "fp8":
        v8t, vs = quantize_fp8(v.transpose(-1, -2), granularity="token")
        vd = v8t.to(torch.float32).transpose(-1, -2)  # scales applied at the end, per channel
    else:
        vd = v.to(torch.float16 if v.dtype == torch.float32 else v.dtype).to(torch.float32)
    qd = qd.reshape(b, hkv, g, r, d)
    visible_end = rows + causal_offset(mode, sq, sk)  # key j visible iff j <= visible_end
    m = torch.full((b, hkv, g, r), float("-inf"), device=q.device)
    l_sum = torch.zeros((b, hkv, g, r), device=q.device)
    acc = torch.zeros((b, hkv, g, r, d), device=q.device)
    for j0 in range(0, sk, tile_n):
        j1 = min(sk, j0 + tile_n)
        s = torch.matmul(qd, kd[:, :, None, j0:j1].transpose(-1, -2))
        s = s * (row_f.unsqueeze(-1) * col_f[:, :, None, None, j0:j1])
        if q_hi_rows is not None:
            s = s + torch.matmul(q_hi_rows, k_hi[:, :, None, j0:j1].transpose(-1, -2)) * qk_scale
        if mode:
            cols = torch.arange(j0, j1, device=q.device)
            s = s.masked_fill(cols[None, :] > visible_end[:, None], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - (m_use - _P_SHIFT).unsqueeze(-1))
        alpha = torch.exp2(m - m_use)
        l_sum = l_sum * alpha + p.sum(dim=-1)
        if pv_dtype == "fp8":
            p = p.clamp(max=448.0).to(torch.float8_e4m3fn)
        else:
            p = p.to(v.dtype if v.dtype != torch.float32 else torch.float16)
        acc = acc * alpha.unsqueeze(-1) + torch.matmul(p.to(torch.float32), vd[:, :, None, j0:j1])
        m = m_new
    empty = l_sum == 0
    l_safe = torch.where(empty, torch.ones_like(l_sum), l_sum)
    out = acc / l_safe.unsqueeze(-1)
    if pv_dtype == "fp8":
        out = out * vs[:, :, None, None, :]
    q_rows = q.to(torch.float32)[:, :, rows].reshape(b, hkv, g, r, d)
    shift = (q_rows * mu[:, :, None, None, :]).sum(-1) * scale
    lse = (m + torch.log2(l_safe) - _P_SHIFT) * _LN2 + shift
    lse = lse.masked_fill(empty, float("-inf"))
    return out.reshape(b, hq, r, d).to(q.dtype), lse.reshape(b, hq, r)


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: CausalArg = False,
    scale: float | None = None,
    return_lse: bool = False,
    pv_dtype: str = "fp8",
    granularity: str = "block",
    block_size: int = 128,
    tile_n: int | None = None,
    rows: torch.Tensor | None = None,
    qk_dtype: str = "int8",
    outlier_channels: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention simulated in plain PyTorch (the correctness reference of the FP8 kernel).

    See the module docstring for the exact steps. Runs on any device (CPU included) since the
    rounding is done by ``torch.float8_e4m3fn`` casts and all products in float32.

    Args:
        q: Queries ``(B, Hq, Sq, D)``, float16/bfloat16/float32.
        k: Keys ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``.
        v: Values ``(B, Hkv, Sk, D)``.
        causal: ``False``; ``True`` / ``"bottom_right"`` (query ``i`` sees keys
            ``j ≤ i + Sk − Sq``) or ``"top_left"`` (keys ``j ≤ i``), as in
            :func:`adaattn_kernels.attention`.
        scale: Score scale ``τ``; default ``1/sqrt(D)``.
        return_lse: Also return the float32 natural-log log-sum-exp ``(B, Hq, R)``.
        pv_dtype: ``"fp8"`` (P and V in e4m3) or ``"fp16"`` (P·V in the 16-bit input dtype;
            float16 for float32 inputs).
        granularity: Scale groups of Q and K: ``"block"`` (default: both per block of
            ``block_size`` tokens), ``"q_token"`` (one scale per query token, per block of
            ``block_size`` keys) or ``"token"`` (both per token).
        block_size: Tokens per scale group for ``"block"``.
        tile_n: Keys per online-softmax tile; default: the kernel's tile
            (:func:`adaattn_kernels.fp8.kernel_tile_n`), which reproduces its rounding of P.
        rows: Optional 1-D integer tensor of query indices: only these rows are computed
            (with their true positions for the causal mask). ``None`` computes all.
        qk_dtype: ``"int8"`` (default; :func:`quantize_int8`) or ``"fp8"`` (e4m3) for Q and K.
        outlier_channels: ``0`` (default), ``16`` or ``32``: channels of ``Q·Kᵀ`` kept in
            16-bit (see :func:`~adaattn_kernels.fp8.fp8_attention`).

    Returns:
        The output ``(B, Hq, R, D)`` in ``q.dtype`` (``R = Sq`` or ``len(rows)``), or
        ``(output, lse)``. Rows that see no key give output 0 and ``lse = -inf``.

    Raises:
        ValueError: invalid shapes, options or rows.
        TypeError: unsupported dtypes.
    """
    shape = check_attention_inputs(q, k, v, allowed_dtypes=_REF_DTYPES)
    mode = normalize_causal(causal)
    tau = resolve_scale(scale, shape.head_dim)
    check_fp8_options(pv_dtype, granularity, block_size, qk_dtype, outlier_channels, shape.head_dim)
    if tile_n is None:
        tile_n = kernel_tile_n()
    if isinstance(tile_n, bool) or not isinstance(tile_n, int) or tile_n < 1:
        raise ValueError(f"`tile_n` must be a positive int, got {tile_n!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` contains NaN or Inf; FP8 quantisation needs finite inputs")
    idx = _check_rows(rows, shape.seq_q, q.device)
    with torch.no_grad():
        out, lse = _simulate(
            q, k, v, idx, mode, tau, pv_dtype, granularity, block_size, tile_n, qk_dtype,
            outlier_channels,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def fp8_attention_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    pv_dtype: str = "fp8",
    granularity: str = "block",
    block_size: int = 128,
    tile_n: int | None = None,
    qk_dtype: str = "int8",
    outlier_channels: int = 0,
    confidence: float | None = None,
) -> torch.Tensor:
    """Per-head relative error of FP8 attention on (sampled) query rows, measured.

    Runs :func:`fp8_attention_reference` on ``rows`` and exact float64 attention
    (:func:`adaattn_kernels.attention_reference`) on the same rows, and returns
    ``‖O_fp8 − O‖_F / ‖O‖_F`` per ``(batch, head)`` over those rows. Cost: quantising Q, K, V
    once plus ``O(len(rows) · Sk · D)`` per head — the planner samples a few hundred rows.

    Args:
        q: Queries ``(B, Hq, Sq, D)``.
        k: Keys ``(B, Hkv, Sk, D)``.
        v: Values ``(B, Hkv, Sk, D)``.
        rows: 1-D integer tensor of query indices (``None``: all rows).
        causal: As in :func:`fp8_attention_reference`.
        scale: Score scale; default ``1/sqrt(D)``.
        pv_dtype: ``"fp8"`` or ``"fp16"``.
        granularity: ``"q_token"``, ``"block"`` or ``"token"``.
        block_size: Tokens per scale group for ``"block"`` (K only for ``"q_token"``).
        tile_n: Keys per online-softmax tile; default: the kernel's.
        qk_dtype: ``"int8"`` (default) or ``"fp8"``: the precision of ``Q·Kᵀ``.
        outlier_channels: Channels of ``Q·Kᵀ`` kept in 16-bit (0, 16 or 32).
        confidence: If given (e.g. 0.95), the one-sided upper confidence bound of the ratio
            estimator at that level instead of the point estimate (rows treated as a sample of
            the ``Sq`` rows; no effect when every row is measured).

    Returns:
        float32 tensor ``(B, Hq)``; 0 for a head whose exact output on the rows is 0.
    """
    from adaattn_kernels.flash.naive import attention_reference

    shape = check_attention_inputs(q, k, v, allowed_dtypes=_REF_DTYPES)
    check_confidence(confidence)
    idx = _check_rows(rows, shape.seq_q, q.device)
    approx = fp8_attention_reference(
        q, k, v, causal=causal, scale=scale, pv_dtype=pv_dtype, granularity=granularity,
        block_size=block_size, tile_n=tile_n, rows=idx, qk_dtype=qk_dtype,
        outlier_channels=outlier_channels,
    )  # fmt: skip
    assert isinstance(approx, torch.Tensor)
    mode = normalize_causal(causal)
    mask = None
    if mode:
        end = idx + causal_offset(mode, shape.seq_q, shape.seq_k)
        mask = torch.arange(shape.seq_k, device=q.device)[None, :] <= end[:, None]
    with torch.no_grad():
        exact = attention_reference(
            q[:, :, idx].double(), k.double(), v.double(), attn_mask=mask, scale=scale
        )
    assert isinstance(exact, torch.Tensor)
    num = (approx.double() - exact).square().sum(dim=-1)  # (B, H, rows)
    den = exact.square().sum(dim=-1)
    # Every row measured: no sampling error (checked only when a bound is asked for).
    complete = confidence is not None and int(idx.unique().numel()) == shape.seq_q
    return relative_error_from_rows(num, den, confidence=confidence, complete=complete).float()
