# Triton kernels take untyped tensor-pointer arguments.
# mypy: disable-error-code="no-untyped-def"
"""Triton kernels of the 8-bit attention path: fused quantisation and the attention forward.

``Q·Kᵀ`` runs in int8 (``QK_INT8``, the default of the op) or e4m3; ``P·V`` in e4m3 or 16-bit.
Int8 quantisation (``INT8`` of ``_quant_rows_kernel``, ``QK_INT8`` of the attention kernel)
implements :func:`adaattn_kernels.fp8.quantize_int8` bit-exactly: ``scale = amax / 127``
(IEEE division), ``xq = rne(clamp(x / scale, ±127))``, the rounding done by adding and
subtracting 1.5·2²³ in fp32 (exact round-half-even for ``|x| ≤ 2²²``, on the GPU and in the
interpreter alike). The int8 ``tl.dot`` accumulates in int32 (exact: ``|Σ| ≤ 127²·D``) and the
product is converted to fp32 and multiplied by ``s_q · s_k · τ · log2 e`` (SageAttention,
Zhang et al. 2024, arXiv 2410.02367, Sec. 3.3–3.4).

Quantisation (``_quant_rows_kernel``, ``_quant_channels_t_kernel``) implements the contract of
:func:`adaattn_precision.quantize_fp8` for e4m3 (``margin=0``, no power-of-two scales)
bit-exactly: ``scale = amax · float32(1/448)`` (``1`` for an all-zero group, at least the
smallest normal float32), ``xq = rne(clamp(x / scale, ±448))`` with an IEEE division. The
rounding to e4m3 is done in integer arithmetic (:func:`_round_e4m3`) before the (then exact)
cast, because the Triton interpreter's fp32→fp8 cast is not round-to-nearest-even
(``triton/runtime/interpreter.py``, ``_convert_float``: ties round away from zero, a mantissa
carry is OR-ed into the exponent so e.g. 31.6 becomes 16, subnormal results are truncated). On
the GPU the cast is ``cvt.rn.satfinite`` and the pre-rounding is a no-op that costs a few
integer instructions in a memory-bound kernel.

Attention (``_fp8_attn_fwd_kernel``): FlashAttention-2's online softmax (Dao 2023,
arXiv 2307.08691, Algorithm 1) with

* ``S = (Q8 K8ᵀ) · s_q · s_k · τ log2 e`` — e4m3 operands, per-block (or per-token) scales
  applied to the fp32 product; K was smoothed (``K − mean_s K``, exact under softmax,
  SageAttention, Zhang et al. 2024, arXiv 2410.02367, Sec. 3.2);
* ``P' = exp2(S − m + 8) ∈ [0, 256]`` — the static power-of-two scale puts the probabilities in
  the e4m3 range (SageAttention2, arXiv 2411.10958, Sec. 4.3 uses 448) and cancels against
  ``l = Σ P'``;
* ``O += P'8 · V8`` with V in e4m3 per channel (scale applied once at the end), or ``P'`` in the
  input's 16-bit dtype against the 16-bit V;
* two-level accumulation: each tile's ``P'V`` comes out of its own tensor-core accumulation and
  is added to the fp32 running sum on the CUDA cores (``acc = acc·α + dot(P, V)``), so the
  reduced-precision FP8 accumulator of Hopper never spans more than one key tile
  (SageAttention2 Sec. 4.4; vllm#23813). Triton keeps the two sums apart for fp8 operands on
  sm_90 (its ``addf(dot(a, b, 0), c) → dot(a, b, c)`` rewrite is disabled when
  ``max_num_imprecise_acc != 0``, the sm_90 fp8 default).

Both dots use K-major operands as sm_90 FP8 ``wgmma`` requires: Q8 and K8 are stored with the
head dimension contiguous and V8 is stored transposed (``(B, H, D, Sk)``, keys contiguous).
K and V tiles are loaded by TMA (host-side ``TensorDescriptor``s), which keeps them out of the
register file and lets Triton multi-buffer them; P·V is computed as two dots over the two halves
of the head dimension, so the per-tile product needs half the registers. Compiled for sm_90
(``tests/test_fp8_compile.py``, Triton 3.6) the kernel uses ≤ 255 registers with at most a few
spilled (0–32 bytes per thread at head_dim 128); with pointer loads or one full-width P·V product
it spilled 800+ bytes per thread.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from adaattn_kernels._triton import KernelLauncher, interpreting
from adaattn_kernels.fp8.quant import kernel_tile_n

_INTERPRET = interpreting()  # fixed at import, as Triton itself reads the flag
if _INTERPRET:
    from adaattn_kernels.flash import _interpreter_compat

    _interpreter_compat.apply()

FP8_MAX = tl.constexpr(448.0)
INT8_MAX = tl.constexpr(127.0)
#: 1.5 · 2**23: ``(x + RNE_MAGIC) - RNE_MAGIC`` rounds fp32 ``|x| ≤ 2**22`` half-to-even.
RNE_MAGIC = tl.constexpr(12582912.0)
#: ``float32(1 / 448)`` (1/448 is not a binary fraction: the contract fixes this rounding).
INV_FP8_MAX = tl.constexpr(float(np.float32(1.0 / 448.0)))
#: log2 of the static probability scale: P' = P · 2**P_SHIFT.
P_SHIFT = tl.constexpr(8.0)
#: Key tile of the attention kernel (see :func:`adaattn_kernels.fp8.quant.kernel_tile_n`).
BLOCK_N = kernel_tile_n()
#: Rows of the padded Q8/K8 buffers and keys of the padded V8ᵀ buffer are multiples of this.
PAD = 128


# --------------------------------------------------------------------------------------------
# Rounding helper.
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_e4m3(x):
    """Round fp32 ``x`` (``|x| ≤ 448``) to the nearest e4m3 value, ties to even, in fp32."""
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    # Normal range (|x| >= 2**-6): keep 3 of the 23 mantissa bits, round half to even; a carry
    # into the exponent is the correct next binade.
    lsb = (bits >> 20) & 1
    rn = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 = ~0xFFFFF
    # Subnormal range: multiples of 2**-9, i.e. round |x| * 512 (< 8, exact) to an even integer.
    t = ax * 512.0
    fl = tl.floor(t)
    frac = t - fl
    odd = (fl.to(tl.int32) & 1) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    rs = (fl + tl.where(up, 1.0, 0.0)) * 0.001953125
    r = tl.where(ax < 0.015625, rs, rn).to(tl.int32, bitcast=True)
    # Restore the sign bit (``-r`` would turn -0.0 into +0.0: Triton negates as ``0 - r``).
    sign = x.to(tl.int32, bitcast=True) < 0
    return tl.where(sign, r | -2147483648, r).to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(x, ROUND_SW: tl.constexpr):
    """Cast fp32 ``x`` (already in ``[-448, 448]``) to e4m3 with round-to-nearest-even."""
    if ROUND_SW:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _scale_of(amax):
    """The contract's scale: ``amax · float32(1/448)``, 1 for an all-zero group, ≥ fp32 tiny."""
    s = tl.where(amax > 0, amax * INV_FP8_MAX, 1.0)
    return tl.maximum(s, 1.1754943508222875e-38)


@triton.jit
def _scale_int8(amax):
    """Symmetric int8 scale: ``amax / 127`` (IEEE), 1 for an all-zero group, ≥ fp32 tiny."""
    s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, INT8_MAX, tl.float32)), 1.0)
    return tl.maximum(s, 1.1754943508222875e-38)


@triton.jit
def _group_scale(amax, INT8: tl.constexpr):
    """The scale of a group with maximum ``amax``: int8 or e4m3 contract."""
    if INT8:  # noqa: SIM108 (compile-time branches read better in kernels)
        s = _scale_int8(amax)
    else:
        s = _scale_of(amax)
    return s


@triton.jit
def _quantize_scaled(xs, INT8: tl.constexpr, ROUND_SW: tl.constexpr):
    """``xs = x / scale`` → int8 (clamp ±127, round half to even) or e4m3 (clamp ±448, RNE)."""
    if INT8:
        y = tl.minimum(tl.maximum(xs, -INT8_MAX), INT8_MAX)
        r = ((y + RNE_MAGIC) - RNE_MAGIC).to(tl.int8)
    else:
        r = _to_e4m3(tl.minimum(tl.maximum(xs, -FP8_MAX), FP8_MAX), ROUND_SW)
    return r


# --------------------------------------------------------------------------------------------
# Quantisation of Q / K (scales over blocks of tokens or single tokens).
# --------------------------------------------------------------------------------------------


@triton.jit
def _quant_rows_kernel(
    X, MU, XQ, SCALE,
    stride_xb, stride_xh, stride_xs,
    stride_mb, stride_mh,
    H, SEQ, SEQ_P, N_SCALES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QBLOCK: tl.constexpr,
    ROWS: tl.constexpr, SMOOTH: tl.constexpr, ROUND_SW: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """One program per scale group (``QBLOCK`` tokens; per-token groups use ``QBLOCK == 1``).

    ``X`` is ``(B, H, SEQ, HEAD_DIM)`` with unit last stride; ``XQ`` is the contiguous
    ``(B, H, SEQ_P, HEAD_DIM)`` e4m3 (or, ``INT8``, int8) output; ``SCALE`` is
    ``(B, H, N_SCALES)`` float32; ``MU``
    (``SMOOTH`` only) is the float32 ``(B, H, HEAD_DIM)`` mean subtracted before quantising.
    """
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    q_base = XQ + pid_bh.to(tl.int64) * SEQ_P * HEAD_DIM
    if SMOOTH:
        mu = tl.load(MU + b * stride_mb + h * stride_mh + offs_d, mask=dmask, other=0.0)
    if QBLOCK == 1:
        # Per-token scales: ROWS tokens per program, one pass.
        rows = pid_g * ROWS + tl.arange(0, ROWS)
        rmask = rows < SEQ
        m2 = rmask[:, None] & dmask[None, :]
        x = tl.load(
            x_base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :], mask=m2, other=0.0
        ).to(tl.float32)
        if SMOOTH:
            x = tl.where(m2, x - mu[None, :], 0.0)
        scale = _group_scale(tl.max(tl.abs(x), 1), INT8)
        xs = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        tl.store(
            q_base + rows[:, None] * HEAD_DIM + offs_d[None, :],
            _quantize_scaled(xs, INT8, ROUND_SW),
            mask=m2,
        )
        tl.store(SCALE + pid_bh.to(tl.int64) * N_SCALES + rows, scale, mask=rmask)
    else:
        start = pid_g * QBLOCK
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for r0 in range(0, QBLOCK, ROWS):
            rows = start + r0 + tl.arange(0, ROWS)
            m2 = ((rows < SEQ) & (rows < start + QBLOCK))[:, None] & dmask[None, :]
            x = tl.load(
                x_base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            if SMOOTH:
                x = tl.where(m2, x - mu[None, :], 0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        scale = _group_scale(tl.max(amax, 0), INT8)
        for r0 in range(0, QBLOCK, ROWS):
            rows = start + r0 + tl.arange(0, ROWS)
            m2 = ((rows < SEQ) & (rows < start + QBLOCK))[:, None] & dmask[None, :]
            x = tl.load(
                x_base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                mask=m2,
                other=0.0,
            ).to(tl.float32)
            if SMOOTH:
                x = x - mu[None, :]
            xs = tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * scale)
            tl.store(
                q_base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                _quantize_scaled(xs, INT8, ROUND_SW),
                mask=m2,
            )
        tl.store(SCALE + pid_bh.to(tl.int64) * N_SCALES + pid_g, scale)


# --------------------------------------------------------------------------------------------
# Quantisation of V: one scale per channel, written transposed (keys contiguous).
# --------------------------------------------------------------------------------------------


@triton.jit
def _quant_channels_t_kernel(
    X, AMAX, XQT, SCALE,
    stride_xb, stride_xh, stride_xs,
    H, SEQ, SEQ_P,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ROUND_SW: tl.constexpr,
):  # fmt: skip
    """Quantise ``ROWS`` tokens of ``X`` (B, H, SEQ, D) per channel into ``XQT`` (B, H, D, SEQ_P).

    ``AMAX`` is the float32 ``(B, H, D)`` max |x| over the sequence; the first program of each
    head also writes the scales ``SCALE`` (B, H, D).
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    amax = tl.load(AMAX + pid_bh.to(tl.int64) * HEAD_DIM + offs_d, mask=dmask, other=0.0)
    scale = _scale_of(amax)
    if pid_s == 0:
        tl.store(SCALE + pid_bh.to(tl.int64) * HEAD_DIM + offs_d, scale, mask=dmask)
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    # Tile laid out (D, ROWS) so the store runs along the keys, the contiguous dim of XQT.
    m2 = dmask[:, None] & (rows < SEQ)[None, :]
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(
        x_base + rows[None, :].to(tl.int64) * stride_xs + offs_d[:, None], mask=m2, other=0.0
    ).to(tl.float32)
    xs = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    xs = tl.minimum(tl.maximum(xs, -FP8_MAX), FP8_MAX)
    out = XQT + pid_bh.to(tl.int64) * HEAD_DIM * SEQ_P
    tl.store(out + offs_d[:, None] * SEQ_P + rows[None, :], _to_e4m3(xs, ROUND_SW), mask=m2)


# --------------------------------------------------------------------------------------------
# Attention forward.
# --------------------------------------------------------------------------------------------


def _fwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm, w, s in [(128, 8, 2), (128, 8, 3), (64, 4, 3)]
    ]


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    # head_dim 128 with 4 warps spills ~150 B/thread (sm_90, Triton 3.6): 8 warps only.
    if kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM")) == 128 and not _INTERPRET:
        return [c for c in configs if c.num_warps == 8] or configs
    return configs


# fmt: off
@triton.jit
def _attn_tiles(
    acc0, acc1, pv0, pv1, l_i, m_i, q8, row_f, desc_k, ks_base, desc_v, kv_row, v_row, b, hkv,
    offs_m, offs_n, lo, hi, SEQ_K, DIAG, N_KS, q_hi, khi_base, qk_scale, inv_qk_scale,
    K_BLOCK: tl.constexpr, K_SCALAR: tl.constexpr, Q_SCALAR: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PV_FP8: tl.constexpr,
    ROUND_SW: tl.constexpr, HALF: tl.constexpr, QK_INT8: tl.constexpr, N_HI: tl.constexpr,
):
    """Stream key tiles ``[lo, hi)`` through the online softmax (two accumulator halves)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k8 = desc_k.load([kv_row + start_n, 0])  # (BLOCK_N, D) int8 / e4m3, TMA
        qk = tl.dot(q8, k8.T)  # int8: int32 accumulator (exact); e4m3: fp32
        if QK_INT8:
            qk = qk.to(tl.float32)
        if MASKED:
            ok = cols[None, :] < SEQ_K
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + DIAG)
            qk = tl.where(ok, qk, float("-inf"))
        if N_HI > 0:
            # Outlier channels: the 8-bit product is brought to the units of the 16-bit one
            # (``Q_hi·K̃_hiᵀ``), which then accumulates into it in place — a separate fp32
            # score tile would cost 64 more registers per thread and spill.
            khi = tl.load(khi_base + cols[:, None].to(tl.int64) * N_HI
                          + tl.arange(0, N_HI)[None, :])
            if K_SCALAR:
                g = row_f * tl.load(ks_base + start_n // K_BLOCK) * inv_qk_scale
            else:
                g = row_f * inv_qk_scale
                ks = tl.load(ks_base + cols // K_BLOCK, mask=(cols // K_BLOCK) < N_KS, other=1.0)
                qk = qk * ks[None, :]
            if Q_SCALAR:  # noqa: SIM108
                qk = qk * g
            else:
                qk = qk * g[:, None]
            qk = tl.dot(q_hi, khi.T, qk)
            f2 = qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        elif K_SCALAR:
            # One positive factor per row: max and exponent use qk directly, so the scaling
            # and the shift fuse into one FMA per score.
            ks = tl.load(ks_base + start_n // K_BLOCK)
            f = row_f * ks
            if Q_SCALAR:  # noqa: SIM108 (compile-time branches read better in kernels)
                f2 = f
            else:
                f2 = f[:, None]
            m_new = tl.maximum(m_i, tl.max(qk, 1) * f)
        else:
            ks = tl.load(ks_base + cols // K_BLOCK, mask=(cols // K_BLOCK) < N_KS, other=1.0)
            if Q_SCALAR:  # noqa: SIM108
                qk = qk * (ks * row_f)[None, :]
            else:
                qk = qk * row_f[:, None] * ks[None, :]
            f2 = 1.0
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # noqa: SIM108
            # A row with nothing visible yet keeps m = -inf: shift by 0 instead (no NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk * f2 - (m_use - P_SHIFT)[:, None])  # P' = 256·exp2(S − m) ≤ 256
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Two-level accumulation, deferred by one tile: the previous tile's P·V (its own
        # tensor-core accumulation, still in flight while this tile's Q·Kᵀ and softmax ran) is
        # added to the fp32 sum now, and this tile's P·V is issued into fresh accumulators.
        # P·V is split in two halves of the head dimension to halve the registers it needs.
        acc0 = (acc0 + pv0) * alpha[:, None]
        acc1 = (acc1 + pv1) * alpha[:, None]
        if PV_FP8:
            p8 = _to_e4m3(p, ROUND_SW)
            v0 = desc_v.load([v_row, start_n])  # (HALF, BLOCK_N) of V8ᵀ: keys contiguous
            v1 = desc_v.load([v_row + HALF, start_n])
            pv0 = tl.dot(p8, v0.T)
            pv1 = tl.dot(p8, v1.T)
        else:
            v0 = desc_v.load([b, hkv, start_n, 0]).reshape(BLOCK_N, HALF)
            v1 = desc_v.load([b, hkv, start_n, HALF]).reshape(BLOCK_N, HALF)
            p16 = p.to(v0.dtype)
            pv0 = tl.dot(p16, v0)
            pv1 = tl.dot(p16, v1)
        m_i = m_new
    return acc0, acc1, pv0, pv1, l_i, m_i


@triton.autotune(
    configs=_fwd_configs(),
    key=["SEQ_BUCKET_Q", "SEQ_BUCKET_K", "HEAD_DIM", "CAUSAL", "PV_FP8", "Q_BLOCK", "K_BLOCK",
         "FUSE_Q", "QK_INT8", "N_HI"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _fp8_attn_fwd_kernel(
    Q, Q8, QS, desc_k, KS, MU, desc_v, VS, Out, Lse, QHI_IDX, KHI,
    stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om,
    H, GROUP, SEQ_Q, SEQ_K, SEQ_QP, SEQ_KP, N_QS, N_KS, DIAG, sm_scale,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, FUSE_Q: tl.constexpr, ROUND_SW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, N_HI: tl.constexpr,
):
    """One program per (query block, batch·head); see the module docstring.

    ``desc_k``: TMA descriptor of K8 (int8 if ``QK_INT8``, else e4m3) viewed as
    ``(B·Hkv·SEQ_KP, D)``, block ``(BLOCK_N, D)``.
    ``desc_v``: for e4m3 P·V, V8ᵀ viewed as ``(B·Hkv·D, SEQ_KP)``, block ``(D/2, BLOCK_N)``;
    for 16-bit P·V, the input V ``(B, Hkv, Sk, D)``, block ``(1, 1, BLOCK_N, D/2)``.
    ``FUSE_Q``: quantise the Q tile here from the 16-bit ``Q`` (per-token scales, or blocks of
    ``Q_BLOCK`` rows with ``Q_BLOCK % BLOCK_M == 0``: the program reads its whole block for the
    maximum). Otherwise ``Q8`` / ``QS`` hold Q quantised by ``_quant_rows_kernel``.
    ``N_HI`` > 0: ``QHI_IDX`` ``(B·Hkv, N_HI)`` int32 holds the outlier channels of each KV
    head and ``KHI`` ``(B·Hkv, SEQ_KP, N_HI)`` K̃ at those channels in 16-bit; the program
    gathers Q's outlier channels from ``Q``, zeroes them before quantising (K8 was quantised
    without them) and adds ``Q_hi·K̃_hiᵀ·τ log2 e`` to every score tile.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    n_mblocks = tl.cdiv(SEQ_Q, BLOCK_M)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = n_mblocks - 1 - pid_m  # longest rows first: better tail balance
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    bhkv = b * (H // GROUP) + hkv
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * 1.4426950408889634
    Q_SCALAR: tl.constexpr = (Q_BLOCK % BLOCK_M) == 0
    K_SCALAR: tl.constexpr = (K_BLOCK % BLOCK_N) == 0

    # The 16-bit Q tile: quantised here (FUSE_Q) and used for the lse term τ·q·mean(K) that the
    # smoothing of K removed from every score of the row.
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    rmask = offs_m < SEQ_Q
    x = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32)
    mu = tl.load(MU + bhkv.to(tl.int64) * HEAD_DIM + offs_d)
    shift = tl.sum(x * mu[None, :], 1) * sm_scale
    if N_HI > 0:
        hi_idx = tl.load(QHI_IDX + bhkv.to(tl.int64) * N_HI + tl.arange(0, N_HI))
        q_hi = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + hi_idx[None, :],
                       mask=rmask[:, None], other=0.0)
        hit = tl.sum((offs_d[:, None] == hi_idx[None, :]).to(tl.int32), 1) > 0
        x = tl.where(hit[None, :], 0.0, x)  # quantise the other channels only
    else:
        hit = offs_d < 0
        q_hi = x  # unused
    khi_base = KHI + bhkv.to(tl.int64) * SEQ_KP * N_HI
    if FUSE_Q:
        if Q_BLOCK == BLOCK_M:  # the block is this tile
            qs = _group_scale(tl.max(tl.max(tl.abs(x), 1), 0), QK_INT8)
            xs = tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * qs)
        elif Q_SCALAR:  # the block spans several tiles: read all of it for the maximum
            blk0 = (start_m // Q_BLOCK) * Q_BLOCK
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for r0 in range(0, Q_BLOCK, BLOCK_M):
                rows = blk0 + r0 + tl.arange(0, BLOCK_M)
                y = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                            mask=(rows < SEQ_Q)[:, None], other=0.0).to(tl.float32)
                y = tl.where(hit[None, :], 0.0, y)
                amax = tl.maximum(amax, tl.max(tl.abs(y), 1))
            qs = _group_scale(tl.max(amax, 0), QK_INT8)
            xs = tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * qs)
        else:  # per-token scales (Q_BLOCK == 1)
            qs = _group_scale(tl.max(tl.abs(x), 1), QK_INT8)
            xs = tl.math.div_rn(x, tl.broadcast_to(qs[:, None], x.shape))
        q8 = _quantize_scaled(xs, QK_INT8, ROUND_SW)
        row_f = qs * qk_scale
    else:
        q8 = tl.load(Q8 + (pid_bh.to(tl.int64) * SEQ_QP + offs_m[:, None]) * HEAD_DIM
                     + offs_d[None, :])
        if Q_SCALAR:
            row_f = tl.load(QS + pid_bh.to(tl.int64) * N_QS + start_m // Q_BLOCK) * qk_scale
        else:
            qi = offs_m // Q_BLOCK
            row_f = tl.load(QS + pid_bh.to(tl.int64) * N_QS + qi, mask=qi < N_QS, other=1.0)
            row_f = row_f * qk_scale

    ks_base = KS + bhkv.to(tl.int64) * N_KS
    kv_row = bhkv * SEQ_KP  # first row of this kv head in the K8 view
    v_row = bhkv * HEAD_DIM  # first row of this kv head in the V8ᵀ view

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)

    # Key tiles [0, full) are visible to every row of the block (no masking); [full, hi) hold
    # the causal diagonal and/or the ragged end of the keys.
    if CAUSAL:
        hi = tl.minimum(SEQ_K, tl.maximum(start_m + BLOCK_M + DIAG, 0))
        full = tl.minimum(hi, tl.maximum(start_m + DIAG + 1, 0))
    else:
        hi = SEQ_K
        full = SEQ_K
    full = (full // BLOCK_N) * BLOCK_N
    pv0 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    pv1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc0, acc1, pv0, pv1, l_i, m_i = _attn_tiles(
        acc0, acc1, pv0, pv1, l_i, m_i, q8, row_f, desc_k, ks_base, desc_v, kv_row, v_row, b,
        hkv, offs_m, offs_n, 0, full, SEQ_K, DIAG, N_KS, q_hi, khi_base, qk_scale,
        1.0 / qk_scale, K_BLOCK,
        K_SCALAR, Q_SCALAR, BLOCK_N, False, CAUSAL, PV_FP8, ROUND_SW, HALF, QK_INT8, N_HI)
    acc0, acc1, pv0, pv1, l_i, m_i = _attn_tiles(
        acc0, acc1, pv0, pv1, l_i, m_i, q8, row_f, desc_k, ks_base, desc_v, kv_row, v_row, b,
        hkv, offs_m, offs_n, full, hi, SEQ_K, DIAG, N_KS, q_hi, khi_base, qk_scale,
        1.0 / qk_scale, K_BLOCK,
        K_SCALAR, Q_SCALAR, BLOCK_N, True, CAUSAL, PV_FP8, ROUND_SW, HALF, QK_INT8, N_HI)
    acc0 += pv0  # the last tile's product
    acc1 += pv1

    # Epilogue: normalise, undo the V channel scales, store; lse in natural log.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    offs_h = tl.arange(0, HALF)
    if PV_FP8:
        vs_base = VS + bhkv.to(tl.int64) * HEAD_DIM
        out0 = acc0 * inv_l[:, None] * tl.load(vs_base + offs_h)[None, :]
        out1 = acc1 * inv_l[:, None] * tl.load(vs_base + HALF + offs_h)[None, :]
    else:
        out0 = acc0 * inv_l[:, None]
        out1 = acc1 * inv_l[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_h[None, :])
    tl.store(o_ptrs, out0.to(Out.dtype.element_ty), mask=rmask[:, None])
    tl.store(o_ptrs + HALF, out1.to(Out.dtype.element_ty), mask=rmask[:, None])
    lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i)) - P_SHIFT) * 0.6931471805599453 + shift
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Lse + pid_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=rmask)
# fmt: on


#: Launchers that replay the compiled kernels on repeat calls (see KernelLauncher).
launch_quant_rows = KernelLauncher(_quant_rows_kernel)
launch_quant_channels_t = KernelLauncher(_quant_channels_t_kernel)
launch_fwd = KernelLauncher(_fp8_attn_fwd_kernel)
