"""AdaAttn: adaptive attention for PyTorch.

``adaattn`` is the package users install. It offers

* :func:`scaled_dot_product_attention` — PyTorch's SDPA signature and meaning, run by AdaAttn's
  kernels (exact by default);
* :class:`AdaAttnConfig` — the per-head error budget and what the planner may do (FP8,
  hybrid low-rank far field);
* :class:`AdaptiveAttention` — an ``nn.Module`` attention core that plans per layer and head
  and caches its plans;
* :mod:`adaattn.planner` — the planner and its :class:`AttentionPlan` records;
* :mod:`adaattn.integrations.transformers` — ``attn_implementation="adaattn"`` for Hugging Face
  models;
* the ``adaattn`` command line (``adaattn doctor``, ``adaattn analyze``).
"""

from adaattn.__about__ import __version__
from adaattn.config import MODES, AdaAttnConfig
from adaattn.dispatch import DispatchStats, dispatch_stats, reset_dispatch_stats
from adaattn.exceptions import AdaAttnFallbackWarning, SDPAArgumentError, SDPATypeError
from adaattn.functional import scaled_dot_product_attention
from adaattn.module import AdaptiveAttention
from adaattn.planner import AttentionPlan, HeadPlan, Planner, PlannerStats

__all__ = [
    "MODES",
    "AdaAttnConfig",
    "AdaAttnFallbackWarning",
    "AdaptiveAttention",
    "AttentionPlan",
    "DispatchStats",
    "HeadPlan",
    "Planner",
    "PlannerStats",
    "SDPAArgumentError",
    "SDPATypeError",
    "__version__",
    "dispatch_stats",
    "reset_dispatch_stats",
    "scaled_dot_product_attention",
]
