# Triton @jit functions take tl.tensor / constexpr values; Python annotations do not apply.
# mypy: disable-error-code="no-untyped-def"
"""Triton kernels of the dense flash-attention path (FlashAttention-2 forward and backward).

Forward: Dao 2023 (arXiv 2307.08691), Algorithm 1 — one program per (query block, batch·head)
streams key/value tiles through an online softmax kept in base 2 (scores are pre-multiplied by
``scale · log2(e)`` so the exponentials are ``exp2``). Key tiles that no row of the block can
see are skipped; tiles that need no masking (interior of the causal triangle, full tiles) take a
branch without the index arithmetic.

Backward: Algorithm 2, split in two kernels so that no atomics are needed:

* ``_bwd_dkdv``: one program per (key block, batch·kv-head) holds ``K_j, V_j`` and their
  gradient accumulators, and loops over the query blocks of every query head of its GQA group
  — the reduction of ``dK``/``dV`` over the group happens in registers.
* ``_bwd_dq``: one program per (query block, batch·q-head) loops over key blocks.

Both recompute ``P = exp2(S·log2e − lse·log2e)`` from the saved log-sum-exp and use
``δ_i = rowsum(dO_i ∘ O_i) − dlse_i`` (the ``dlse`` term makes the returned lse differentiable).

Masks: ``MASK_KIND`` 0 = none, 1 = boolean (uint8, nonzero = may attend), 2 = additive float.
The mask is addressed through four strides, so broadcast dimensions cost no memory (stride 0).
Causal masking: key ``j`` is visible to query ``i`` iff ``j ≤ i + diag`` (``diag = Sk − Sq`` for
bottom-right alignment, 0 for top-left).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from adaattn_kernels._triton import KernelLauncher, interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_INTERPRET = interpreting()  # fixed at import, as Triton itself reads the flag
if _INTERPRET:
    from adaattn_kernels.flash import _interpreter_compat

    _interpreter_compat.apply()


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length: autotuning is keyed on it, not on ``n``."""
    return 1 << max(0, min(n, 16384) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Autotuning configurations. Kept short: every config is compiled for every key on first use.
# --------------------------------------------------------------------------------------------


def _set_kv_block(nargs: dict) -> None:
    """Autotune pre-hook: give host-side TMA descriptors the config's (BLOCK_N, HEAD_DIM) box."""
    for name in ("desc_k", "desc_v"):
        desc = nargs.get(name)
        if desc is not None and hasattr(desc, "block_shape"):
            desc.block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _fwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    cfgs = []
    # Measured on an H200 at seq 8192 (tools/bench/tune_flash.py, notes in
    # tools/bench/flash_tuning.md): (128, 64, 8, 3/4) best at head_dim 64, (128, 128, 8, 3) or
    # (128, 64, 8, 3) at 128; 256-row tiles (16 warps) were slower everywhere.
    for bm, bn, w, s in [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 8, 4),
        (64, 64, 4, 3),
    ]:
        cfgs.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn},
                num_warps=w,
                num_stages=s,
                pre_hook=_set_kv_block,
            )
        )
    return cfgs


def _no_autotune() -> bool:
    """``ADAATTN_FLASH_AUTOTUNE=0``: use each kernel's first config (fast tests, no tuning)."""
    return os.environ.get("ADAATTN_FLASH_AUTOTUNE", "1") == "0"


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    if d >= 256 and not _INTERPRET:
        # 256-wide tiles: a (64, 256) fp32 accumulator already fills half the register file.
        return [
            triton.Config(
                {"BLOCK_M": 64, "BLOCK_N": 64},
                num_warps=4,
                num_stages=2,
                pre_hook=_set_kv_block,
            )
        ]
    out = [c for c in configs if not (d <= 64 and c.kwargs["BLOCK_M"] == 64)] or configs
    return out[:1] if _no_autotune() else out


def _bwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    cfgs = []
    # dK/dV: (64, 128, 8, 2/3) best at head_dim 128, (32, 64, 4, 4) / (64, 64, 4, 3) at 64.
    for bm, bn, w, s in [
        (64, 128, 8, 2),
        (64, 128, 8, 3),
        (32, 64, 4, 4),
        (64, 64, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _dq_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    cfgs = []
    # dQ: (128, 64, 8, 3) best except causal head_dim 64, where (64, 64, 4, 3) wins.
    for bm, bn, w, s in [
        (128, 64, 8, 3),
        (64, 64, 4, 3),
        (128, 128, 8, 2),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _prune_dkdv(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    if d >= 256 and not _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1)]
    return configs[:1] if _no_autotune() else configs


def _prune_dq(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    if d >= 256 and not _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1)]
    return configs[:1] if _no_autotune() else configs


_KEY = ["SEQ_BUCKET_Q", "SEQ_BUCKET_K", "BLOCK_D", "CAUSAL", "MASK_KIND"]
_FWD_KEY = [*_KEY, "USE_TMA", "EXP2_MODE"]


# --------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    ptrs,
    rows,
    n_rows,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    """Load a (rows, BLOCK_D) tile; zero outside ``rows < n_rows`` / ``d < HEAD_DIM``."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(
                ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0
            )
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _apply_mask(
    s,
    mask_base,
    stride_mm,
    stride_mn,
    rows,
    cols,
    seq_q,
    seq_k,
    MASK_KIND: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Apply the user mask to a base-2 score tile ``s`` (rows × cols, or cols × rows)."""
    if TRANSPOSED:
        ptrs = mask_base + cols[:, None] * stride_mn + rows[None, :] * stride_mm
        inb = (cols[:, None] < seq_k) & (rows[None, :] < seq_q)
    else:
        ptrs = mask_base + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        inb = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
    if MASK_KIND == 1:
        keep = tl.load(ptrs, mask=inb, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    else:
        add = tl.load(ptrs, mask=inb, other=float("-inf")).to(tl.float32)
        s = s + add * 1.4426950408889634
    return s


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


@triton.jit
def _exp2_poly(x):
    """``2**x`` for ``x <= 0`` on the FMA/ALU pipes instead of the MUFU unit (FlashAttention-4).

    ``x = j + f`` with ``j = round(x)`` (by the 1.5·2²³ magic-add, no float→int conversion) and
    ``|f| <= 1/2``; ``2**f`` from a degree-3 polynomial (relative error 7.7e-5, fitted for this
    code; below bf16's and fp16's rounding of ``P``); ``2**j`` added into the exponent bits.
    Inputs below -126 are clamped (the result is < 2⁻¹²⁶, negligible against the row maximum 1).
    """
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.05508876591920853 * f + 0.24260465800762177
    p = p * f + 0.6932762861251831
    p = p * f + 0.999928891658783
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP2_MODE: tl.constexpr):
    """``exp2`` of a score tile: 0 MUFU ``ex2``; FMA-pipe polynomial for 1 half, 2 all, 3 a quarter.

    On Hopper the exponentials cost about half as long as the tile's two matrix products on the
    MUFU unit (16 per clock per SM). The polynomial costs 3 FADD + 3 FFMA + 1 IMAD per element
    in the sm_90 SASS (128 / 128 / 64 per clock), about the same time per element on the FMA
    pipes, which also carry the softmax's other work — so the best share is between 0 and 1/2.
    The column split is register-local: the MMA accumulator layout gives each thread pairs of
    adjacent columns.
    """
    if EXP2_MODE == 0:
        return tl.math.exp2(x)
    elif EXP2_MODE == 2:
        return _exp2_poly(x)
    elif EXP2_MODE == 1:
        a, b = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N // 2, 2)))
        return tl.reshape(tl.join(tl.math.exp2(a), _exp2_poly(b)), (BLOCK_M, BLOCK_N))
    else:
        a, b = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N // 2, 2)))
        b0, b1 = tl.split(tl.reshape(b, (BLOCK_M, BLOCK_N // 4, 2)))
        b = tl.reshape(tl.join(tl.math.exp2(b0), _exp2_poly(b1)), (BLOCK_M, BLOCK_N // 2))
        return tl.reshape(tl.join(tl.math.exp2(a), b), (BLOCK_M, BLOCK_N))


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    desc_k,
    desc_v,
    kv_row0,
    mask_base,
    stride_mm,
    stride_mn,
    offs_m,
    offs_n,
    offs_d,
    lo,
    hi,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EXP2_MODE: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if USE_TMA and not MASKED:
            # Full tiles never cross the end of this head's keys: bulk tensor copies (TMA).
            k = desc_k.load([kv_row0 + start_n, 0])
        else:
            k = _load_rows(
                k_base + cols[:, None] * stride_kn + offs_d[None, :],
                cols,
                seq_k,
                offs_d,
                HEAD_DIM,
                BLOCK_D,
                MASKED,
            )
        s = tl.dot(q, tl.trans(k))
        if MASKED or MASK_KIND != 0:
            s = s * qk_scale
            if MASK_KIND != 0:
                s = _apply_mask(
                    s, mask_base, stride_mm, stride_mn, offs_m, cols, seq_q, seq_k, MASK_KIND, False
                )
            if MASKED:
                ok = cols[None, :] < seq_k
                if CAUSAL:
                    ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf: shift by 0 instead (no NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            # Unmasked tile: fold the scale into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = _exp2(s * qk_scale - m_use[:, None], BLOCK_M, BLOCK_N, EXP2_MODE)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA and not MASKED:
            v = desc_v.load([kv_row0 + start_n, 0])
        else:
            v = _load_rows(
                v_base + cols[:, None] * stride_vn + offs_d[None, :],
                cols,
                seq_k,
                offs_d,
                HEAD_DIM,
                BLOCK_D,
                MASKED,
            )
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_fwd_configs(), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd}
)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    HeadIdx,
    desc_k,
    desc_v,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    heads_q,
    group,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    SEQ_BUCKET_Q,
    SEQ_BUCKET_K,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    USE_TMA: tl.constexpr,
    EXP2_MODE: tl.constexpr,
    HEAD_LIST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Heaviest blocks (most keys) first: evens out the tail of the launch.
        pid_m = tl.num_programs(0) - 1 - pid_m
    # HEAD_LIST: only the listed flattened (batch, head) indices (a mixed hybrid plan's exact
    # heads); otherwise every head of the grid.
    pid_bh = tl.load(HeadIdx + tl.program_id(1)) if HEAD_LIST else tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    off_hk = off_h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    q = _load_rows(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
    else:
        hi = seq_k
        full = seq_k
    full = (full // BLOCK_N) * BLOCK_N
    kv_row0 = ((off_b * (heads_q // group) + off_hk) * seq_k).to(tl.int32)
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        desc_k,
        desc_v,
        kv_row0,
        mask_base,
        stride_mm,
        stride_mn,
        offs_m,
        offs_n,
        offs_d,
        0,
        full,
        seq_q,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        CAUSAL,
        MASK_KIND,
        USE_TMA,
        BLOCK_M,
        EXP2_MODE,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        desc_k,
        desc_v,
        kv_row0,
        mask_base,
        stride_mm,
        stride_mn,
        offs_m,
        offs_n,
        offs_d,
        full,
        hi,
        seq_q,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        MASK_KIND,
        USE_TMA,
        BLOCK_M,
        EXP2_MODE,
    )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    row_ok = offs_m < seq_q
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)
    o_ptrs = (
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    )
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(
            o_ptrs,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        )


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    Out,
    dOut,
    dLse,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_db,
    stride_dh,
    stride_dm,
    heads_q,
    seq_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = _load_rows(
        dOut
        + off_b * stride_db
        + off_h * stride_dh
        + offs_m[:, None] * stride_dm
        + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_ok = offs_m < seq_q
    if HAS_DLSE:
        dlse = tl.load(dLse + pid_bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
        delta = delta - dlse
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    mask_base,
    stride_mm,
    stride_mn,
    offs_n,
    offs_m0,
    offs_d,
    lo,
    hi,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        q = _load_rows(
            q_base + rows[:, None] * stride_qm + offs_d[None, :],
            rows,
            seq_q,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            MASKED,
        )
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < seq_q, other=float("inf"))
        else:
            lse = tl.load(lse_base + rows)
        # Fully masked rows carry lse = -inf: make their probabilities 0, not exp2(+inf).
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        st = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): Sᵀ in base 2
        if MASK_KIND != 0:
            st = _apply_mask(
                st, mask_base, stride_mm, stride_mn, rows, offs_n, seq_q, seq_k, MASK_KIND, True
            )
        if MASKED and CAUSAL:
            st = tl.where(offs_n[:, None] <= rows[None, :] + diag, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        do = _load_rows(
            do_base + rows[:, None] * stride_dom + offs_d[None, :],
            rows,
            seq_q,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            MASKED,
        )
        dv = tl.dot(pt.to(do.dtype), do, dv)
        if MASKED:
            delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        dpt = tl.dot(v, tl.trans(do)).to(tl.float32)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(
    configs=_bwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune_dkdv}
)
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    heads_q,
    heads_kv,
    group,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    scale,
    SEQ_BUCKET_Q,
    SEQ_BUCKET_K,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_kv).to(tl.int64)
    off_hk = (pid_bh % heads_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(
        K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    v = _load_rows(
        V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows that see this key block: i ≥ start_n − diag (causal); rows that see all of it:
    # i ≥ start_n + BLOCK_N − 1 − diag. Stage 1 (masked) covers the diagonal band, stage 2 the
    # full interior blocks, stage 3 (masked) the ragged tail of the queries.
    q_floor = (seq_q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        full = tl.maximum(start_n + BLOCK_N - 1 - diag, 0)
        full = ((full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        mid = tl.maximum(lo, tl.minimum(full, q_floor))
        tail = tl.maximum(mid, q_floor)
    else:
        lo = 0
        mid = 0
        tail = q_floor

    for g in range(0, group):
        off_h = off_hk * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = dOut + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * heads_q + off_h) * seq_q
        lse_base = Lse + row_base
        delta_base = Delta + row_base
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        if CAUSAL:
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                stride_qm,
                stride_dom,
                mask_base,
                stride_mm,
                stride_mn,
                offs_n,
                offs_m0,
                offs_d,
                lo,
                mid,
                seq_q,
                seq_k,
                diag,
                qk_scale,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                True,
                CAUSAL,
                MASK_KIND,
            )
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_dom,
            mask_base,
            stride_mm,
            stride_mn,
            offs_n,
            offs_m0,
            offs_d,
            mid,
            q_floor,
            seq_q,
            seq_k,
            diag,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            False,
            CAUSAL,
            MASK_KIND,
        )
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_dom,
            mask_base,
            stride_mm,
            stride_mn,
            offs_n,
            offs_m0,
            offs_d,
            tail,
            seq_q,
            seq_q,
            seq_k,
            diag,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            True,
            CAUSAL,
            MASK_KIND,
        )

    dk = dk * scale
    n_ok = offs_n[:, None] < seq_k
    if BLOCK_D != HEAD_DIM:
        n_ok = n_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(
        dK
        + off_b * stride_dkb
        + off_hk * stride_dkh
        + offs_n[:, None] * stride_dkn
        + offs_d[None, :],
        dk.to(dK.dtype.element_ty),
        mask=n_ok,
    )
    tl.store(
        dV
        + off_b * stride_dvb
        + off_hk * stride_dvh
        + offs_n[:, None] * stride_dvn
        + offs_d[None, :],
        dv.to(dV.dtype.element_ty),
        mask=n_ok,
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    mask_base,
    stride_mm,
    stride_mn,
    offs_m,
    offs_n0,
    offs_d,
    lo,
    hi,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        k = _load_rows(
            k_base + cols[:, None] * stride_kn + offs_d[None, :],
            cols,
            seq_k,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            MASKED,
        )
        v = _load_rows(
            v_base + cols[:, None] * stride_vn + offs_d[None, :],
            cols,
            seq_k,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            MASKED,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK_KIND != 0:
            s = _apply_mask(
                s, mask_base, stride_mm, stride_mn, offs_m, cols, seq_q, seq_k, MASK_KIND, False
            )
        if MASKED:
            ok = cols[None, :] < seq_k
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(
    configs=_dq_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune_dq}
)
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    dOut,
    Lse,
    Delta,
    dQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    heads_q,
    group,
    seq_q,
    seq_k,
    diag,
    qk_scale,
    scale,
    SEQ_BUCKET_Q,
    SEQ_BUCKET_K,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    off_hk = off_h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q

    q = _load_rows(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = _load_rows(
        dOut
        + off_b * stride_dob
        + off_h * stride_doh
        + offs_m[:, None] * stride_dom
        + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    row_base = pid_bh.to(tl.int64) * seq_q
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seq_k)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), seq_k)
    else:
        hi = seq_k
        full = seq_k
    full = (full // BLOCK_N) * BLOCK_N
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mm,
        stride_mn,
        offs_m,
        offs_n0,
        offs_d,
        0,
        full,
        seq_q,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        CAUSAL,
        MASK_KIND,
    )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mm,
        stride_mn,
        offs_m,
        offs_n0,
        offs_d,
        full,
        hi,
        seq_q,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        MASK_KIND,
    )
    dq = dq * scale
    d_ok = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        d_ok = d_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(
        dQ
        + off_b * stride_dqb
        + off_h * stride_dqh
        + offs_m[:, None] * stride_dqm
        + offs_d[None, :],
        dq.to(dQ.dtype.element_ty),
        mask=d_ok,
    )


# --------------------------------------------------------------------------------------------
# Merging two partial results (ring attention, split key sets)
# --------------------------------------------------------------------------------------------


@triton.jit
def _merge_states_kernel(
    Out,
    Lse,
    OutB,
    LseB,
    stride_ob,
    stride_oh,
    stride_om,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_pb,
    stride_ph,
    stride_pm,
    stride_qb,
    stride_qh,
    stride_qm,
    heads,
    seq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """In place: ``(Out, Lse) ← merge((Out, Lse), (OutB, LseB))`` over one block of rows.

    ``Out``/``OutB`` are ``(B, H, S, D)`` with a contiguous last dimension, ``Lse``/``LseB``
    ``(B, H, S)`` float32; every other stride is free, so row slices merge without copies.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // heads).to(tl.int64)
    off_h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq
    la_ptr = Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm
    la = tl.load(la_ptr, mask=row_ok, other=0.0)
    lb = tl.load(
        LseB + off_b * stride_qb + off_h * stride_qh + offs_m * stride_qm, mask=row_ok, other=0.0
    )
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    l_new = m + tl.log(tl.exp(la - m) + tl.exp(lb - m))  # -inf when both are; NaN propagates
    ref = tl.where(l_new == float("-inf"), 0.0, l_new)
    wa = tl.exp(la - ref)
    wb = tl.exp(lb - ref)
    o_ptr = (
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    )
    o = _load_rows(o_ptr, offs_m, seq, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    ob = _load_rows(
        OutB
        + off_b * stride_pb
        + off_h * stride_ph
        + offs_m[:, None] * stride_pm
        + offs_d[None, :],
        offs_m,
        seq,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    ).to(tl.float32)
    merged = o * wa[:, None] + ob * wb[:, None]
    d_ok = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        d_ok = d_ok & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptr, merged.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(la_ptr, l_new, mask=row_ok)


#: Launchers that replay the compiled kernels on repeat calls (see KernelLauncher).
launch_fwd = KernelLauncher(_fwd_kernel)
launch_bwd_delta = KernelLauncher(_bwd_delta_kernel)
launch_bwd_dkdv = KernelLauncher(_bwd_dkdv_kernel)
launch_bwd_dq = KernelLauncher(_bwd_dq_kernel)
launch_merge_states = KernelLauncher(_merge_states_kernel)
