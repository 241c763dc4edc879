"""Plain-PyTorch reference of FP8 attention: the same quantisation, simulated with torch's float8.

:func:`fp8_attention_reference` computes what the Triton kernel computes, step by step, with
``torch.float8_e4m3fn`` doing the rounding and float32 doing the arithmetic:

1. K smoothing: ``K̃ = K − mean_s K`` (float32 mean over the keys). Softmax is invariant to a
   per-row constant, and ``q·(k − μ) = q·k − q·μ`` shifts row ``i`` by ``q_i·μ`` only, so the
   output is unchanged; the log-sum-exp gets ``τ q_i·μ`` added back (SageAttention, Zhang et
   al. 2024, arXiv 2410.02367, Sec. 3.2).
2. ``(Q8, s_q) = quantize_fp8(Q)``, ``(K8, s_k) = quantize_fp8(K̃)`` with
   :func:`adaattn_precision.quantize_fp8` (e4m3, per block of ``block_size`` tokens or per
   token), and for FP8 ``P·V``: ``(V8ᵀ, s_v) = quantize_fp8(Vᵀ, granularity="token")``, i.e.
   one scale per channel of V.
3. Scores in base 2: ``S = (Q8 K8ᵀ) s_q s_kᵀ τ log2 e``.
4. The online softmax of FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithm 1) replayed
   over key tiles of ``tile_n`` keys — the kernel's tiles — because the running maximum ``m``
   at each tile fixes how the probabilities are rounded:
   ``P' = 2^(S − m + 8)`` (in ``[0, 256]``), ``l ← l·α + Σ P'``,
   ``acc ← acc·α + fp8(P') · V8`` (or ``P'`` and ``V`` in the input's 16-bit dtype).
5. ``O = acc · s_v / l``; ``lse = ln 2 · (m + log2 l − 8) + τ q·mean(K)``.

The function also evaluates only selected query rows (``rows=``), which is what the planner
needs to measure a head's FP8 error cheaply: :func:`fp8_attention_error`.
"""

from __future__ import annotations

import math

import torch
from adaattn_precision import dequantize_fp8, quantize_fp8

from adaattn_kernels._validation import (
    CausalArg,
    causal_offset,
    check_attention_inputs,
    normalize_causal,
    resolve_scale,
)
from adaattn_kernels.fp8.quant import kernel_tile_n

__all__ = ["PV_DTYPES", "fp8_attention_error", "fp8_attention_reference"]

#: Accepted values of ``pv_dtype``.
PV_DTYPES = ("fp8", "fp16")
_GRANULARITIES = ("block", "token")
_LN2 = math.log(2.0)
_P_SHIFT = 8.0
_REF_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_fp8_options(pv_dtype: str, granularity: str, block_size: int) -> None:
    """Validate the FP8 options shared by the kernel and the reference."""
    if pv_dtype not in PV_DTYPES:
        raise ValueError(
            f"`pv_dtype` must be 'fp8' (P and V in e4m3) or 'fp16' (P·V in the 16-bit input "
            f"dtype), got {pv_dtype!r}"
        )
    if granularity not in _GRANULARITIES:
        raise ValueError(f"`granularity` must be 'block' or 'token', got {granularity!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"`block_size` must be an int, got {type(block_size).__name__}")
    if not 1 <= block_size <= 4096:
        raise ValueError(f"`block_size` must be in [1, 4096] tokens, got {block_size}")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated core of :func:`fp8_attention_reference`; ``rows`` is an int64 index tensor."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    gran, bs = granularity, block_size
    mu = torch.mean(k, dim=-2, dtype=torch.float32)  # (B, Hkv, D); the op uses the same call
    q8, qs = quantize_fp8(q, granularity=gran, block_size=bs)
    k8, ks = quantize_fp8(k.to(torch.float32) - mu.unsqueeze(-2), granularity=gran, block_size=bs)
    # Dequantised operands (e4m3 value × float32 scale, rounded once to float32) differ from
    # the kernel's order (scales applied to the fp32 product Q8·K8ᵀ) by float32 rounding only.
    qd = dequantize_fp8(q8, qs, granularity=gran, block_size=bs)[:, :, rows]  # (B, Hq, R, D)
    kd = dequantize_fp8(k8, ks, granularity=gran, block_size=bs)
    if pv_dtype == "fp8":
        v8t, vs = quantize_fp8(v.transpose(-1, -2), granularity="token")
        vd = v8t.to(torch.float32).transpose(-1, -2)  # scales applied at the end, per channel
    else:
        vd = v.to(torch.float16 if v.dtype == torch.float32 else v.dtype).to(torch.float32)
    r = rows.numel()
    qd = qd.reshape(b, hkv, g, r, d)
    visible_end = rows + causal_offset(mode, sq, sk)  # key j visible iff j <= visible_end
    qk_scale = scale / _LN2  # τ · log2(e)
    m = torch.full((b, hkv, g, r), float("-inf"), device=q.device)
    l_sum = torch.zeros((b, hkv, g, r), device=q.device)
    acc = torch.zeros((b, hkv, g, r, d), device=q.device)
    for j0 in range(0, sk, tile_n):
        j1 = min(sk, j0 + tile_n)
        s = torch.matmul(qd, kd[:, :, None, j0:j1].transpose(-1, -2)) * qk_scale
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
        granularity: Scale groups of Q and K: ``"block"`` of ``block_size`` tokens or
            ``"token"``.
        block_size: Tokens per scale group for ``"block"``.
        tile_n: Keys per online-softmax tile; default: the kernel's tile
            (:func:`adaattn_kernels.fp8.kernel_tile_n`), which reproduces its rounding of P.
        rows: Optional 1-D integer tensor of query indices: only these rows are computed
            (with their true positions for the causal mask). ``None`` computes all.

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
    check_fp8_options(pv_dtype, granularity, block_size)
    if tile_n is None:
        tile_n = kernel_tile_n()
    if isinstance(tile_n, bool) or not isinstance(tile_n, int) or tile_n < 1:
        raise ValueError(f"`tile_n` must be a positive int, got {tile_n!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` contains NaN or Inf; FP8 quantisation needs finite inputs")
    idx = _check_rows(rows, shape.seq_q, q.device)
    with torch.no_grad():
        out, lse = _simulate(q, k, v, idx, mode, tau, pv_dtype, granularity, block_size, tile_n)
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
        granularity: ``"block"`` or ``"token"``.
        block_size: Tokens per scale group for ``"block"``.
        tile_n: Keys per online-softmax tile; default: the kernel's.

    Returns:
        float32 tensor ``(B, Hq)``; 0 for a head whose exact output on the rows is 0.
    """
    from adaattn_kernels.flash.naive import attention_reference

    shape = check_attention_inputs(q, k, v, allowed_dtypes=_REF_DTYPES)
    idx = _check_rows(rows, shape.seq_q, q.device)
    approx = fp8_attention_reference(
        q, k, v, causal=causal, scale=scale, pv_dtype=pv_dtype, granularity=granularity,
        block_size=block_size, tile_n=tile_n, rows=idx,
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
    err = (approx.double() - exact).flatten(2).norm(dim=-1)
    ref = exact.flatten(2).norm(dim=-1)
    return torch.where(ref > 0, err / ref.clamp_min(1e-300), torch.zeros_like(err)).float()
