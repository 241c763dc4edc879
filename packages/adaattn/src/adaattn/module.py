"""``AdaptiveAttention``: a drop-in attention core (an ``nn.Module``) with a per-layer plan cache.

Use it where a model calls ``F.scaled_dot_product_attention`` on projected queries, keys and
values. Each instance belongs to one layer (``layer_idx``): it keeps that layer's plans across
calls, replans as :attr:`AdaAttnConfig.replan` says, and counts where its calls ran.
"""

from __future__ import annotations

import torch
from torch import nn

from adaattn.config import AdaAttnConfig
from adaattn.functional import attention_call
from adaattn.planner import AttentionPlan, Planner, PlannerStats

__all__ = ["AdaptiveAttention"]


class AdaptiveAttention(nn.Module):
    """Attention core with SDPA semantics, planned per head under an error budget.

    Args:
        config: What the layer may do (default: exact attention, equal to torch SDPA).
        layer_idx: Index of the layer in the model; recorded in its plans.

    Example:
        >>> import torch
        >>> from adaattn import AdaptiveAttention
        >>> attn = AdaptiveAttention(layer_idx=0)
        >>> q = k = v = torch.randn(2, 4, 32, 16)
        >>> attn(q, k, v, is_causal=True).shape
        torch.Size([2, 4, 32, 16])
    """

    def __init__(self, config: AdaAttnConfig | None = None, *, layer_idx: int = 0) -> None:
        super().__init__()
        if config is None:
            config = AdaAttnConfig()
        if not isinstance(config, AdaAttnConfig):
            raise TypeError(f"config must be an AdaAttnConfig, got {type(config).__name__}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        self.config = config
        self.layer_idx = layer_idx
        self.planner = Planner(config, layer_idx=layer_idx)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        scale: float | None = None,
        dropout_p: float = 0.0,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """Attention of ``query`` over ``key``/``value``, with the arguments of torch SDPA.

        See :func:`adaattn.scaled_dot_product_attention` for shapes, masks and errors.
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
            config=self.config,
            planner=self.planner,
        )

    @property
    def plan(self) -> AttentionPlan | None:
        """The most recent plan of this layer (``None`` before any planned call)."""
        return self.planner.last_plan

    @property
    def stats(self) -> PlannerStats:
        """Counts of this layer's calls, plans and per-mode head decisions."""
        return self.planner.stats

    def reset_plans(self) -> None:
        """Forget cached plans (the next eligible call plans again)."""
        self.planner.clear()

    def extra_repr(self) -> str:
        """Layer index and allowed modes, shown in ``repr(model)``."""
        return f"layer_idx={self.layer_idx}, modes={self.config.modes}"
