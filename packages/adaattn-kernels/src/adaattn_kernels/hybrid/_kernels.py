# Triton @jit functions take tl.tensor / constexpr values; Python annotations do not apply.
# mypy: disable-error-code="no-untyped-def"
"""Triton kernels of the hybrid path: far-field pooling and the hybrid forward.

``_pool_kernel``: one program per (segment, batch·q-head) averages the segment's keys and values
(float32 accumulation) into ``(B·Hq, T, D)`` buffers stored in the input dtype — one pass over K
and V, ``O(Sk · D)`` per head. Exact heads and segments past a head's own count exit at once.

``_hybrid_fwd_kernel``: a 1-D grid of (head, query block) work items. Heads are taken in the
order of ``HeadOrder`` (exact heads first: they are the long programs, so scheduling them first
keeps the GPU busy while the short hybrid programs fill the tail — longest-processing-time-first),
and within a causal head the heaviest (last) query block first. Each program reads its head's
plan (``Window``, ``Sinks``, ``Segment``: ``(B·Hq,)`` int32) and runs, in one base-2 online
softmax (FlashAttention-2, Dao 2023, Algorithm 1):

* exact head: every allowed key tile (unmasked interior tiles, masked boundary tiles);
* hybrid head: the sink tiles, the window tiles and the pooled far-field tiles (pooled scores
  get ``+ log2(n_t)``), each with a per-row mask so the three parts are disjoint — the index
  arithmetic is that of :mod:`adaattn_kernels.hybrid.naive`, evaluated per row for the masks and
  on the block's first / last row for the loop bounds (every bound is monotone in the row).

Under ``TRITON_INTERPRET=1`` the dots are done in float32 (the interpreter's bfloat16 ``tl.dot``
is wrong) after the same rounding of ``P`` to the input dtype as on GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from adaattn_kernels._triton import KernelLauncher, graph_bench, interpreting

_INTERPRET = interpreting()  # fixed at import, as Triton itself reads the flag
if _INTERPRET:
    from adaattn_kernels.flash import _interpreter_compat

    _interpreter_compat.apply()

LOG2E = 1.4426950408889634


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length (autotuning key)."""
    return 1 << max(0, min(n, 65536) - 1).bit_length()


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the hybrid forward.
FWD_TILES = ((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3))


def _fwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # Compiled for sm_90 (tests/test_hybrid_compile.py), these spill at most 64 bytes per
    # thread; (128, 64, 4 warps) spilled 1112 B at head_dim 128 and (128, 128, 8, 2) 360-416 B,
    # so they are not candidates.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in FWD_TILES
    ]


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 128))
    # head_dim 128: (64, 64) spills 136-200 B, 32-key tiles none. head_dim 64: every tile is a
    # candidate — on an H100 at 8k keys (w=512, r=128) (64, 32) ran fastest with (64, 64) next
    # (tools/bench/profile_hybrid.py), while long all-exact plans prefer 64-key tiles.
    if d <= 64:
        return configs
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 64)]
    return keep or configs


@triton.jit
def _mm(a, b, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    if INTERPRET:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _mm_acc(a, b, acc, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    if INTERPRET:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax update with base-2 scores ``s`` (``-inf`` = masked) and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf: shift by 0 instead (no NaN).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mm_acc(p.to(v.dtype), v, acc, INTERPRET, IEEE)
    return acc, l_i, m_new


@triton.jit
def _key_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_n,
    offs_d,
    lo,
    hi,
    row_lo,
    row_hi,
    seq_k,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Exact keys ``[lo, hi)`` by tiles; if ``MASKED``, row ``r`` sees only ``[row_lo, row_hi)``."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            kin = cols < seq_k
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kin[:, None], other=0.0
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kin[:, None], other=0.0
            )
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        s = _mm(q, tl.trans(k), INTERPRET, IEEE) * qk_scale
        if MASKED:
            ok = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, INTERPRET, IEEE)
    return acc, l_i, m_i


@triton.jit
def _pooled_tiles(
    acc,
    l_i,
    m_i,
    q,
    kp_base,
    vp_base,
    offs_t,
    offs_d,
    lo,
    hi,
    row_lo,
    row_hi,
    nseg,
    seg,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Pooled segments ``[lo, hi)``; row ``r`` uses ``[row_lo, row_hi)``; scores ``+ log2 n_t``."""
    for start in range(lo, hi, BLOCK_T):
        ts = start + offs_t
        tin = ts < nseg
        kp = tl.load(
            kp_base + ts[:, None] * HEAD_DIM + offs_d[None, :], mask=tin[:, None], other=0.0
        )
        vp = tl.load(
            vp_base + ts[:, None] * HEAD_DIM + offs_d[None, :], mask=tin[:, None], other=0.0
        )
        cnt = tl.minimum(seg, seq_k - ts * seg)
        log_cnt = tl.math.log2(tl.where(tin, cnt, 1).to(tl.float32))
        s = _mm(q, tl.trans(kp), INTERPRET, IEEE) * qk_scale + log_cnt[None, :]
        ok = (ts[None, :] >= row_lo[:, None]) & (ts[None, :] < row_hi[:, None]) & tin[None, :]
        s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, vp, INTERPRET, IEEE)
    return acc, l_i, m_i


@triton.jit
def _window(i, win, seq_q, seq_k, diag, CAUSAL: tl.constexpr):
    """Allowed end ``hi``, window start ``ws`` and (non-causal) window end ``we`` of row ``i``."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(i + diag + 1, 0), seq_k)
        ws = tl.maximum(hi - win, 0)
        we = hi
    else:
        hi = i * 0 + seq_k
        c = tl.minimum(tl.maximum(i + seq_k - seq_q, 0), seq_k - 1)
        ws = tl.minimum(tl.maximum(c - win // 2, 0), tl.maximum(seq_k - win, 0))
        we = tl.minimum(ws + win, seq_k)
    return hi, ws, we


@triton.autotune(
    configs=_fwd_configs(),
    key=["SEQ_BUCKET_Q", "SEQ_BUCKET_K", "PLAN_KIND", "HEAD_DIM", "CAUSAL", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_fwd},
    do_bench=graph_bench,
)
@triton.jit
def _hybrid_fwd_kernel(
    Q,
    K,
    V,
    KP,
    VP,
    Out,
    Lse,
    Window,
    Sinks,
    Segment,
    HeadOrder,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    heads_q,
    group,
    seq_q,
    seq_k,
    diag,
    nseg_max,
    qk_scale,
    SEQ_BUCKET_Q,
    SEQ_BUCKET_K,
    PLAN_KIND,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_mb = tl.cdiv(seq_q, BLOCK_M)
    pid_bh = tl.load(HeadOrder + pid // n_mb)
    mb = pid % n_mb
    if CAUSAL:
        mb = n_mb - 1 - mb  # heaviest query block of the head first
    off_b = (pid_bh // heads_q).to(tl.int64)
    off_h = (pid_bh % heads_q).to(tl.int64)
    off_hk = off_h // group
    win = tl.load(Window + pid_bh)
    snk = tl.load(Sinks + pid_bh)
    seg = tl.load(Segment + pid_bh)

    start_m = mb * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    first = start_m
    last = tl.minimum(start_m + BLOCK_M, seq_q) - 1

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if seg == 0:
        # Exact head: unmasked interior tiles, then the masked causal / ragged boundary.
        if CAUSAL:
            hi_rows = tl.minimum(tl.maximum(offs_m + diag + 1, 0), seq_k)
            hi_blk = tl.minimum(tl.maximum(last + diag + 1, 0), seq_k)
            full = tl.minimum(tl.maximum(first + diag + 1, 0), seq_k)
        else:
            hi_rows = offs_m * 0 + seq_k
            hi_blk = seq_k
            full = seq_k
        full = (full // BLOCK_N) * BLOCK_N
        zero_rows = offs_m * 0
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            0,
            full,
            zero_rows,
            hi_rows,
            seq_k,
            qk_scale,
            BLOCK_N,
            False,
            INTERPRET,
            IEEE,
        )
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            full,
            hi_blk,
            zero_rows,
            hi_rows,
            seq_k,
            qk_scale,
            BLOCK_N,
            True,
            INTERPRET,
            IEEE,
        )
    else:
        # Hybrid head: sinks, window (both exact) and pooled far field, disjoint per row.
        t_lo = (snk + seg - 1) // seg
        s_end = tl.minimum(t_lo * seg, seq_k)
        nseg = (seq_k + seg - 1) // seg
        hi_r, ws_r, we_r = _window(offs_m, win, seq_q, seq_k, diag, CAUSAL)
        hi_f, ws_f, we_f = _window(first, win, seq_q, seq_k, diag, CAUSAL)
        hi_l, ws_l, we_l = _window(last, win, seq_q, seq_k, diag, CAUSAL)
        # Loop bounds come from the first / last valid row; rows past seq_q are never stored.
        # sinks: [0, min(s_end, hi))
        sink_r = tl.minimum(s_end, hi_r)
        zero_rows = offs_m * 0
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            0,
            tl.minimum(s_end, hi_l),
            zero_rows,
            sink_r,
            seq_k,
            qk_scale,
            BLOCK_N,
            True,
            INTERPRET,
            IEEE,
        )
        # window: [max(floor(ws/g)·g, s_end), we') with we' = hi (causal) or ceil(we/g)·g
        exlo_r = tl.maximum((ws_r // seg) * seg, s_end)
        exlo_f = tl.maximum((ws_f // seg) * seg, s_end)
        if CAUSAL:
            exhi_r = hi_r
            exhi_l = hi_l
        else:
            exhi_r = tl.minimum(((we_r + seg - 1) // seg) * seg, seq_k)
            exhi_l = tl.minimum(((we_l + seg - 1) // seg) * seg, seq_k)
        # Tiles inside every row's window, [ceil(exlo_l), floor(exhi_f)), need no mask.
        exlo_l = tl.maximum((ws_l // seg) * seg, s_end)
        exhi_f = hi_f if CAUSAL else tl.minimum(((we_f + seg - 1) // seg) * seg, seq_k)
        w_lo = (exlo_f // BLOCK_N) * BLOCK_N
        in_lo = tl.maximum(((exlo_l + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, w_lo)
        in_hi = tl.maximum((exhi_f // BLOCK_N) * BLOCK_N, in_lo)
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            w_lo,
            tl.minimum(in_lo, exhi_l),
            exlo_r,
            exhi_r,
            seq_k,
            qk_scale,
            BLOCK_N,
            True,
            INTERPRET,
            IEEE,
        )
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            in_lo,
            in_hi,
            exlo_r,
            exhi_r,
            seq_k,
            qk_scale,
            BLOCK_N,
            False,
            INTERPRET,
            IEEE,
        )
        acc, l_i, m_i = _key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            tl.maximum(in_hi, tl.minimum(in_lo, exhi_l)),
            exhi_l,
            exlo_r,
            exhi_r,
            seq_k,
            qk_scale,
            BLOCK_N,
            True,
            INTERPRET,
            IEEE,
        )
        # far field, left of the window: segments [ceil(s/g), floor(ws/g))
        kp_base = KP + pid_bh.to(tl.int64) * nseg_max * HEAD_DIM
        vp_base = VP + pid_bh.to(tl.int64) * nseg_max * HEAD_DIM
        left_hi_r = ws_r // seg
        left_hi_l = ws_l // seg
        acc, l_i, m_i = _pooled_tiles(
            acc,
            l_i,
            m_i,
            q,
            kp_base,
            vp_base,
            offs_n,
            offs_d,
            (t_lo // BLOCK_N) * BLOCK_N,
            left_hi_l,
            zero_rows + t_lo,
            left_hi_r,
            nseg,
            seg,
            seq_k,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            INTERPRET,
            IEEE,
        )
        if not CAUSAL:
            # far field, right of the window: segments [max(ceil(we/g), ceil(s/g)), nseg)
            right_lo_r = tl.maximum((we_r + seg - 1) // seg, t_lo)
            right_lo_f = tl.maximum((we_f + seg - 1) // seg, t_lo)
            acc, l_i, m_i = _pooled_tiles(
                acc,
                l_i,
                m_i,
                q,
                kp_base,
                vp_base,
                offs_n,
                offs_d,
                (right_lo_f // BLOCK_N) * BLOCK_N,
                nseg,
                right_lo_r,
                zero_rows + nseg,
                nseg,
                seg,
                seq_k,
                qk_scale,
                HEAD_DIM,
                BLOCK_N,
                INTERPRET,
                IEEE,
            )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)
    o_ptrs = (
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _pool_kernel(
    K,
    V,
    KP,
    VP,
    Segment,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    heads_q,
    group,
    seq_k,
    nseg_max,
    HEAD_DIM: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.load(Segment + pid_bh)
    nseg = (seq_k + seg - 1) // tl.maximum(seg, 1)
    if (seg > 0) & (t < nseg):
        off_b = (pid_bh // heads_q).to(tl.int64)
        off_hk = (pid_bh % heads_q).to(tl.int64) // group
        k_base = K + off_b * stride_kb + off_hk * stride_kh
        v_base = V + off_b * stride_vb + off_hk * stride_vh
        offs_j = tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, HEAD_DIM)
        start = t * seg
        end = tl.minimum(start + seg, seq_k)
        acc_k = tl.zeros([HEAD_DIM], dtype=tl.float32)
        acc_v = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for j in range(start, end, BLOCK_J):
            rows = j + offs_j
            rin = rows < end
            kt = tl.load(
                k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=rin[:, None], other=0.0
            )
            vt = tl.load(
                v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=rin[:, None], other=0.0
            )
            acc_k += tl.sum(kt.to(tl.float32), 0)
            acc_v += tl.sum(vt.to(tl.float32), 0)
        inv = 1.0 / (end - start).to(tl.float32)
        out_off = (pid_bh.to(tl.int64) * nseg_max + t) * HEAD_DIM + offs_d
        tl.store(KP + out_off, (acc_k * inv).to(KP.dtype.element_ty))
        tl.store(VP + out_off, (acc_v * inv).to(VP.dtype.element_ty))


#: Launchers that replay the compiled kernels on repeat calls (see KernelLauncher).
launch_pool = KernelLauncher(_pool_kernel)
launch_fwd = KernelLauncher(_hybrid_fwd_kernel)
