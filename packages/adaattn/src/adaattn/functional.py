r"""``scaled_dot_product_attention`` with PyTorch's signature, run by AdaAttn's kernels.

With the default configuration the result is exact attention (Vaswani et al. 2017, Eq. 1),

.. math:: \operatorname{Attention}(Q, K, V) = \operatorname{softmax}(s\,QK^\top + M)\,V,

computed by ``adaattn_kernels.attention`` (fused Triton kernel on CUDA, chunked PyTorch
reference elsewhere) with exactly the meaning of
:func:`torch.nn.functional.scaled_dot_product_attention`: boolean masks mean "may attend", float
masks are added to the scores, ``is_causal`` is top-left aligned, ``enable_gqa`` groups query
heads over fewer key/value heads, inputs have any number of leading dimensions, and queries whose
keys are all masked give 0 (as the math backend does). With an adaptive
:class:`~adaattn.AdaAttnConfig` the planner may run some heads in FP8 or low-rank within the
configured error budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaattn import _backends
from adaattn._sdpa import check_arguments, prepare, unsupported_reason
from adaattn.config import AdaAttnConfig
from adaattn.dispatch import _RECORDER

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: AdaAttnConfig | None = None,
) -> torch.Tensor:
    """Drop-in replacement for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``; leading dimensions broadcast against ``query``'s.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: ``None``, a bool mask (``True`` = may attend) or a float mask (bool,
            float32 or ``query.dtype``) added to the scores; broadcastable to
            ``(N, ..., L, S)``.
        dropout_p: Dropout probability on the attention weights. AdaAttn's kernels have no
            dropout: ``dropout_p > 0`` runs ``torch`` SDPA instead and records the fallback
            (:func:`adaattn.dispatch_stats`, :class:`~adaattn.AdaAttnFallbackWarning`).
        is_causal: Causal mask aligned to the top-left corner (query ``i`` sees keys
            ``j ≤ i``), as in PyTorch; an error together with ``attn_mask``.
        scale: Score scale; default ``1/sqrt(E)``.
        enable_gqa: Allow ``Hq`` to be a multiple of the key/value head counts (grouped-query
            attention); key/value heads are never repeated in memory.
        config: ``None`` or an exact :class:`~adaattn.AdaAttnConfig`: exact attention. An
            adaptive config plans each call afresh (use :class:`~adaattn.AdaptiveAttention`
            to cache plans per layer).

    Returns:
        ``(N, ..., Hq, L, Ev)`` in ``query.dtype``.

    Raises:
        adaattn.SDPAArgumentError: (a ``ValueError`` and ``RuntimeError``) where PyTorch
            raises: mismatched shapes or devices, a mask that does not broadcast,
            ``is_causal`` with ``attn_mask``, head counts that do not divide under
            ``enable_gqa``, ``dropout_p`` outside ``[0, 1]``.
        adaattn.SDPATypeError: (a ``TypeError`` and ``RuntimeError``) non-tensor inputs,
            mixed or non-floating dtypes, a mask of another float dtype.
        TypeError: ``config`` is not an :class:`~adaattn.AdaAttnConfig`.

    Example:
        >>> import torch, adaattn
        >>> q, k, v = torch.randn(3, 2, 4, 16, 32).unbind(0)
        >>> out = adaattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    return attention_call(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        config=config,
        planner=None,
    )


def attention_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    *,
    config: AdaAttnConfig | None,
    planner: object | None,
) -> torch.Tensor:
    """Shared body of the functional API and :class:`~adaattn.AdaptiveAttention`.

    ``planner`` is an :class:`adaattn.planner.Planner` keeping plans across calls, or ``None``
    (a fresh planner per call).
    """
    if config is not None and not isinstance(config, AdaAttnConfig):
        raise TypeError(f"config must be an AdaAttnConfig or None, got {type(config).__name__}")
    check_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    reason: str | None
    if dropout_p > 0.0:
        reason = f"dropout_p={dropout_p} > 0 (the AdaAttn kernels have no dropout)"
    else:
        reason = unsupported_reason(query, key, value, scale)
    if reason is not None:
        _RECORDER.fallback(reason)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    problem = prepare(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if config is None or config.is_exact or problem.seq_k < config.min_seq_len:
        out4 = _backends.dense_attention(
            problem.q,
            problem.k,
            problem.v,
            attn_mask=problem.mask,
            causal=problem.causal,
            scale=problem.scale,
        )
        _RECORDER.exact()
        return problem.finish(out4)
    from adaattn.planner import Planner

    if planner is None:
        planner = Planner(config)
    assert isinstance(planner, Planner)
    out4, plan = planner.run(problem)
    if plan.is_exact:
        _RECORDER.exact()
    else:
        _RECORDER.adaptive()
    return problem.finish(out4)
