"""Hugging Face ``transformers`` integration: ``attn_implementation="adaattn"``.

:func:`register` adds AdaAttn to ``transformers.AttentionInterface`` (and the SDPA mask builder to
``AttentionMaskInterface``, since AdaAttn takes SDPA's masks), through the registration API that
transformers provides for custom attention functions; no transformers or torch function is
patched. Any model whose attention goes through the interface (Llama, Qwen, Mistral, SmolLM,
BERT, ...) can then be loaded with it::

    import adaattn.integrations.transformers as adaattn_hf
    from transformers import AutoModelForCausalLM

    adaattn_hf.register()  # exact attention, equal to "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="adaattn")

    adaattn_hf.register("adaattn-adaptive", config=AdaAttnConfig.adaptive(0.02))
    model.set_attn_implementation("adaattn-adaptive")  # plans per layer and head
    plans = adaattn_hf.plans(model)                      # {layer: AttentionPlan}

Each attention module of the model gets its own :class:`~adaattn.planner.Planner` (kept in a
weak map, so nothing is attached to the model), which caches that layer's plans.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import torch

from adaattn.config import AdaAttnConfig
from adaattn.functional import attention_call
from adaattn.planner import AttentionPlan, Planner

__all__ = [
    "DEFAULT_NAME",
    "AdaAttnIntegration",
    "attention_forward",
    "planners",
    "plans",
    "register",
    "registered",
]

#: The name :func:`register` uses by default: ``attn_implementation="adaattn"``.
DEFAULT_NAME = "adaattn"


class AdaAttnIntegration:
    """One registered attention implementation: a config and the per-module planners.

    Calling the instance is the attention function transformers invokes:
    ``(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with
    ``query`` ``(B, Hq, L, D)`` and ``key``/``value`` ``(B, Hkv, S, D)``, returning
    ``(output (B, L, Hq, D), None)`` (attention weights are never materialised).

    Args:
        name: The ``attn_implementation`` name.
        config: Configuration of every layer (default: exact).
    """

    def __init__(self, name: str, config: AdaAttnConfig | None = None) -> None:
        if config is None:
            config = AdaAttnConfig()
        if not isinstance(config, AdaAttnConfig):
            raise TypeError(f"config must be an AdaAttnConfig, got {type(config).__name__}")
        self.name = name
        self.config = config
        self._planners: weakref.WeakKeyDictionary[torch.nn.Module, Planner] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def planner(self, module: torch.nn.Module) -> Planner:
        """The planner of one attention module (created on first use)."""
        with self._lock:
            planner = self._planners.get(module)
            if planner is None:
                layer = getattr(module, "layer_idx", None)
                if not isinstance(layer, int):
                    layer = next(self._counter)
                planner = Planner(self.config, layer_idx=layer)
                self._planners[module] = planner
            return planner

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Attention of one module call; see the class docstring for shapes."""
        for unsupported in ("softcap", "s_aux", "sinks"):  # logit soft-capping, attention sinks
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"attn_implementation='adaattn' does not support `{unsupported}`; "
                    "use attn_implementation='eager' for this model"
                )
        q_len, kv_len = query.shape[2], key.shape[2]
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        # As transformers' sdpa path: causal only for prefill without an explicit mask.
        causal = bool(q_len > 1 and attention_mask is None and is_causal)
        if causal and kv_len > q_len:
            # Top-left causal never reads keys past q_len (prefill into a static cache).
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = kwargs.get("position_bias")
        if position_bias is not None:
            attention_mask = _position_bias_mask(position_bias, attention_mask, causal, query, key)
            causal = False
        out = attention_call(
            query,
            key,
            value,
            attention_mask,
            float(dropout),
            causal,
            scaling,
            query.shape[1] != key.shape[1],
            config=self.config,
            planner=self.planner(module),
        )
        return out.transpose(1, 2).contiguous(), None

    def planners(self, model: torch.nn.Module) -> dict[int, Planner]:
        """Planners of ``model``'s attention modules that have run, by layer index."""
        with self._lock:
            found = [(m, self._planners.get(m)) for m in model.modules()]
        out: dict[int, Planner] = {}
        for _, planner in found:
            if planner is not None and planner.layer_idx is not None:
                out[planner.layer_idx] = planner
        return dict(sorted(out.items()))


_REGISTRY: dict[str, AdaAttnIntegration] = {}


def _position_bias_mask(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """Fold a T5-style additive position bias and the mask into one float mask."""
    neg = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not causal:
            return position_bias
        q_len, kv_len = query.shape[2], key.shape[2]
        tri = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device).tril()
        return torch.where(tri, position_bias, neg)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, neg)
    return position_bias + attention_mask


def register(
    name: str = DEFAULT_NAME,
    *,
    config: AdaAttnConfig | None = None,
    integration: AdaAttnIntegration | None = None,
) -> str:
    """Register AdaAttn with transformers under ``name`` and return the name.

    After this, ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` use AdaAttn. Registering the same name again
    replaces its config (and forgets its plans).

    Args:
        name: The ``attn_implementation`` name (default ``"adaattn"``).
        config: Config of every layer; default exact (equal to ``"sdpa"`` up to rounding).
        integration: A ready :class:`AdaAttnIntegration` (or subclass) to register instead of
            building one from ``config``; its ``name`` must equal ``name``.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed (``pip install "adaattn[transformers]"``).
        ValueError: ``name`` is empty or names one of transformers' own implementations.
        TypeError: ``config`` is not an :class:`~adaattn.AdaAttnConfig`.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # pragma: no cover - exercised without transformers
        raise ImportError(
            "adaattn.integrations.transformers needs transformers>=4.48: "
            'pip install "adaattn[transformers]"'
        ) from exc
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    builtin = {"eager", "sdpa", "flex_attention"} | {f"flash_attention_{i}" for i in (2, 3, 4)}
    if name in builtin or name.startswith("paged|"):
        raise ValueError(f"name {name!r} is one of transformers' own implementations; pick another")
    if integration is None:
        integration = AdaAttnIntegration(name, config)
    elif not isinstance(integration, AdaAttnIntegration) or integration.name != name:
        raise ValueError("integration must be an AdaAttnIntegration whose name is `name`")
    AttentionInterface.register(name, integration)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:  # pragma: no cover - transformers < 4.53 builds masks per model
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTRY[name] = integration
    return name


def registered(name: str = DEFAULT_NAME) -> AdaAttnIntegration:
    """The integration registered under ``name``.

    Raises:
        KeyError: nothing was registered under ``name`` (call :func:`register` first).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no AdaAttn attention is registered as {name!r}; call "
            f"adaattn.integrations.transformers.register({name!r}) first"
        ) from None


def planners(model: torch.nn.Module, name: str | None = None) -> dict[int, Planner]:
    """Per-layer planners of ``model`` (those of the implementation it uses, or ``name``'s).

    Args:
        model: A transformers model that has run with an AdaAttn implementation.
        name: Registered name; default: ``model.config._attn_implementation``.

    Returns:
        ``{layer_idx: Planner}`` for the attention modules that have run.
    """
    if name is None:
        name = getattr(getattr(model, "config", None), "_attn_implementation", None) or DEFAULT_NAME
    return registered(name).planners(model)


def plans(model: torch.nn.Module, name: str | None = None) -> dict[int, AttentionPlan]:
    """The latest plan of every planned layer of ``model`` (see :func:`planners`)."""
    out: dict[int, AttentionPlan] = {}
    for layer, planner in planners(model, name).items():
        if planner.last_plan is not None:
            out[layer] = planner.last_plan
    return out


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of the default registration (exact unless re-registered).

    Same signature and return as transformers' ``sdpa_attention_forward``; see
    :class:`AdaAttnIntegration`.
    """
    integration = _REGISTRY.get(DEFAULT_NAME)
    if integration is None:
        register()
        integration = _REGISTRY[DEFAULT_NAME]
    return integration(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
