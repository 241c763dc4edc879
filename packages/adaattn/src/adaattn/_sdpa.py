"""Validation and 4-D normalisation of SDPA arguments.

:func:`prepare` checks ``query``/``key``/``value``/``attn_mask`` the way
``torch.nn.functional.scaled_dot_product_attention`` (math backend) does, and rewrites the call
as one exact ``(B, H, L, D)`` problem for the kernels: leading dimensions broadcast and flattened,
grouped-query heads kept grouped (never repeated), the mask viewed without copying where its
batch dimensions are broadcast, a value head dimension different from the query's padded with
zeros (exact), and a non-positive ``scale`` folded into the query (exact: negation is exact in
floating point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaattn.exceptions import SDPAArgumentError, SDPATypeError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Problem:
    """One attention call as a 4-D problem: ``q`` (B, H, L, D), ``k``/``v`` (B, Hkv, S, D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    out_lead: tuple[int, ...]
    value_dim: int

    @property
    def seq_q(self) -> int:
        return int(self.q.shape[2])

    @property
    def seq_k(self) -> int:
        return int(self.k.shape[2])

    def finish(self, out4: torch.Tensor) -> torch.Tensor:
        """Turn the kernel output ``(B, H, L, D)`` back into SDPA's ``(..., L, Ev)``."""
        if out4.shape[-1] != self.value_dim:
            out4 = out4[..., : self.value_dim]
        return out4.reshape(*self.out_lead, self.seq_q, self.value_dim)


def _broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError as exc:
        raise SDPAArgumentError(
            f"{what} do not broadcast: {' vs '.join(str(s) for s in shapes)} ({exc}); "
            "leading dimensions of query, key and value must be equal or 1"
        ) from None


def check_arguments(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
    enable_gqa: object,
) -> None:
    """Raise where ``torch`` SDPA raises (and on arguments it would misread)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise SDPATypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(query, torch.Tensor)
    assert isinstance(key, torch.Tensor)
    assert isinstance(value, torch.Tensor)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise SDPAArgumentError(
            "Expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise SDPATypeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead; "
            "cast them with `.to(query.dtype)`."
        )
    if query.dtype not in _FLOAT_DTYPES:
        raise SDPATypeError(
            f"`query` has dtype {query.dtype}; scaled_dot_product_attention needs float16, "
            "bfloat16, float32 or float64 inputs."
        )
    if not (query.device == key.device == value.device):
        raise SDPAArgumentError(
            "Expected query, key, and value to have the same device, but got query.device: "
            f"{query.device} key.device: {key.device} and value.device: {value.device} instead."
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise SDPATypeError(
                f"`attn_mask` must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise SDPATypeError(
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead."
            )
        if attn_mask.device != query.device:
            raise SDPAArgumentError(
                f"`attn_mask` is on {attn_mask.device} but `query` is on {query.device}; move "
                "it with `.to(query.device)`."
            )
    if query.shape[-1] != key.shape[-1]:
        raise SDPAArgumentError(
            f"`query` head dimension {query.shape[-1]} differs from `key` head dimension "
            f"{key.shape[-1]}; the last dimensions of query and key must be equal."
        )
    if key.shape[-2] != value.shape[-2]:
        raise SDPAArgumentError(
            f"`key` has {key.shape[-2]} positions but `value` has {value.shape[-2]}; "
            "dimension -2 of key and value must be equal."
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise SDPATypeError(f"`dropout_p` must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise SDPAArgumentError(
            f"dropout probability has to be between 0 and 1, but got {dropout_p}"
        )
    if not isinstance(is_causal, bool):
        raise SDPATypeError(f"`is_causal` must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise SDPATypeError(f"`enable_gqa` must be a bool, got {type(enable_gqa).__name__}")
    if is_causal and attn_mask is not None:
        raise SDPAArgumentError(
            "_scaled_dot_product_attention: Explicit attn_mask should not be set when "
            "is_causal=True; fold the causal structure into `attn_mask` or drop it."
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise SDPATypeError(f"`scale` must be a float or None, got {type(scale).__name__}")
    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise SDPAArgumentError(
                "enable_gqa=True needs a head dimension (-3) on query, key and value; got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D inputs."
            )
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk != 0 or hq % hv != 0:
            raise SDPAArgumentError(
                "Number of heads in key and value must divide the number of heads in query; "
                f"got query heads {hq}, key heads {hk}, value heads {hv}."
            )


def unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> str | None:
    """Why a validated call must run on torch SDPA rather than the kernels (``None`` if not)."""
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return "empty input tensor (a dimension of size 0)"
    if scale is not None and not math.isfinite(float(scale)):
        return f"non-finite scale {scale}"
    return None


def prepare(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Problem:
    """Rewrite validated SDPA arguments as a 4-D kernel problem (see the module docstring)."""
    e, ev = int(query.shape[-1]), int(value.shape[-1])
    seq_q, seq_k = int(query.shape[-2]), int(key.shape[-2])
    lead_q = tuple(query.shape[:-2])
    lead_k = tuple(key.shape[:-2])
    lead_v = tuple(value.shape[:-2])
    if enable_gqa:
        hq = lead_q[-1]
        eff_k, eff_v = (*lead_k[:-1], hq), (*lead_v[:-1], hq)
    else:
        eff_k, eff_v = lead_k, lead_v
    out_lead = _broadcast([lead_q, eff_k, eff_v], "leading (batch, head) dimensions")
    n = len(out_lead)

    def padded(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * (n - len(shape)) + shape

    if n == 0:
        batch_shape: tuple[int, ...] = ()
        heads = 1
    else:
        batch_shape, heads = out_lead[:-1], out_lead[-1]
    batch = math.prod(batch_shape)

    def to4(t: torch.Tensor, lead: tuple[int, ...], h: int, rows: int, dim: int) -> torch.Tensor:
        t = t.reshape(*padded(lead), rows, dim)
        return t.expand(*batch_shape, h, rows, dim).reshape(batch, h, rows, dim)

    q4 = to4(query, lead_q, heads, seq_q, e)
    hk = padded(lead_k)[-1] if n else 1
    hv = padded(lead_v)[-1] if n else 1
    if hk == hv:
        k4 = to4(key, lead_k, hk, seq_k, e)
        v4 = to4(value, lead_v, hv, seq_k, ev)
    else:  # distinct key and value head counts (allowed by SDPA): group both to `heads`
        k4 = to4(key, lead_k, hk, seq_k, e).repeat_interleave(heads // hk, dim=1)
        v4 = to4(value, lead_v, hv, seq_k, ev).repeat_interleave(heads // hv, dim=1)

    mask4: torch.Tensor | None = None
    if attn_mask is not None:
        target = (*out_lead, seq_q, seq_k)
        try:
            ok = tuple(torch.broadcast_shapes(tuple(attn_mask.shape), target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise SDPAArgumentError(
                f"`attn_mask` of shape {tuple(attn_mask.shape)} does not broadcast to the "
                f"attention weights' shape {target} (..., L, S)."
            )
        m = attn_mask.reshape((1,) * (n + 2 - attn_mask.dim()) + tuple(attn_mask.shape))
        lm, sm = int(m.shape[-2]), int(m.shape[-1])
        mh = int(m.shape[-3]) if n else 1
        mb = tuple(m.shape[: max(n - 1, 0)])
        if math.prod(mb) == 1:
            mask4 = m.reshape(1, mh, lm, sm)
        else:
            mask4 = m.expand(*batch_shape, mh, lm, sm).reshape(batch, mh, lm, sm)

    s = 1.0 / math.sqrt(e) if scale is None else float(scale)
    if s < 0.0:
        q4, s = -q4, -s
    elif s == 0.0:
        q4, s = q4 * 0.0, 1.0  # all scores 0 (NaN/Inf still propagate, as in torch)
    if ev < e:
        v4 = F.pad(v4, (0, e - ev))
    elif ev > e:
        q4 = F.pad(q4, (0, ev - e))
        k4 = F.pad(k4, (0, ev - e))
    return Problem(q4, k4, v4, mask4, is_causal, s, out_lead, ev)
