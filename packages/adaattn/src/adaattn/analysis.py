"""Per-layer, per-head analysis of a transformers model's attention on a text.

:func:`analyze_model` runs the model twice on the same tokens — once with exact AdaAttn attention
and once with an adaptive :class:`~adaattn.AdaAttnConfig` — and records, for every layer and
query head: the normalised attention entropy and the plan the planner chose (mode, window,
rank, estimated error), the Roy–Vetterli effective rank of the sampled attention rows
(``adaattn_linalg.effective_rank``: ``exp`` of the entropy of the normalised singular values,
Roy & Vetterli 2007, Eq. 1), and the model's perplexity under both runs. The result saves as
JSON, as heatmaps (PNG, matplotlib) and as a self-contained HTML report. ``adaattn analyze``
is the command-line front end.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaattn import _backends
from adaattn.config import AdaAttnConfig
from adaattn.integrations.transformers import AdaAttnIntegration, register

__all__ = ["MODE_CODES", "AnalysisResult", "analyze_model"]

#: Integer code of each mode in :attr:`AnalysisResult.mode` (for heatmaps).
MODE_CODES: dict[str, int] = {"exact": 0, "fp8": 1, "hybrid": 2}

_EXACT_NAME = "adaattn-analyze-exact"
_ADAPTIVE_NAME = "adaattn-analyze"


@dataclass
class AnalysisResult:
    """Per-layer × per-head measurements of one model on one text.

    Matrices are lists of rows, one row per layer, one column per query head.

    Attributes:
        model: Model name or path.
        tokens: Number of tokens analysed.
        device: Device the model ran on.
        config: The adaptive config (as a dict).
        entropy: Mean normalised entropy of the sampled attention rows (0 = one key,
            1 = uniform).
        effective_rank: Effective rank of the sampled attention rows (1 … number of rows).
        mode: Chosen mode per head (``"exact"``, ``"fp8"``, ``"hybrid"``).
        estimated_error: Planner's sampled error estimate per head.
        window: Hybrid window per head (0 if not hybrid).
        rank: Hybrid rank per head (0 if not hybrid).
        cost: Plan cost per head relative to exact attention.
        perplexity_exact: Perplexity with exact attention (``None`` for encoders).
        perplexity_adaptive: Perplexity with the adaptive plans (``None`` for encoders).
        output_cosine: Mean cosine similarity of the final hidden states, adaptive vs exact.
    """

    model: str
    tokens: int
    device: str
    config: dict[str, Any]
    entropy: list[list[float]] = field(default_factory=list)
    effective_rank: list[list[float]] = field(default_factory=list)
    mode: list[list[str]] = field(default_factory=list)
    estimated_error: list[list[float]] = field(default_factory=list)
    window: list[list[int]] = field(default_factory=list)
    rank: list[list[int]] = field(default_factory=list)
    cost: list[list[float]] = field(default_factory=list)
    perplexity_exact: float | None = None
    perplexity_adaptive: float | None = None
    output_cosine: float | None = None

    @property
    def layers(self) -> int:
        """Number of layers analysed."""
        return len(self.mode)

    @property
    def heads(self) -> int:
        """Number of query heads per layer."""
        return len(self.mode[0]) if self.mode else 0

    def mode_counts(self) -> dict[str, int]:
        """Heads per mode over all layers."""
        out: dict[str, int] = {}
        for row in self.mode:
            for m in row:
                out[m] = out.get(m, 0) + 1
        return out

    @property
    def mean_cost(self) -> float:
        """Mean plan cost over all heads (1.0 = exact everywhere)."""
        flat = [c for row in self.cost for c in row]
        return sum(flat) / max(len(flat), 1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        out = asdict(self)
        out["mode_counts"] = self.mode_counts()
        out["mean_cost"] = self.mean_cost
        return out

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def heatmap_png(self) -> bytes:
        """Four heatmaps (layer × head): entropy, effective rank, plan mode, estimated error."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm

        fig, axes = plt.subplots(1, 4, figsize=(16, max(3.0, 0.22 * self.layers + 1.5)))
        codes = [[MODE_CODES[m] for m in row] for row in self.mode]
        # exact heads have no approximation error: leave their cells blank
        err = [
            [math.nan if m == "exact" else max(e, 1e-6) for e, m in zip(erow, mrow)]
            for erow, mrow in zip(self.estimated_error, self.mode)
        ]
        panels: list[tuple[str, Any, dict[str, Any]]] = [
            ("normalised entropy", self.entropy, {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}),
            ("effective rank (sampled rows)", self.effective_rank, {"cmap": "magma"}),
            (
                "plan (exact / fp8 / hybrid)",
                codes,
                {
                    "cmap": ListedColormap(["#d9d9d9", "#4c72b0", "#dd8452"]),
                    "norm": BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3),
                },
            ),
            (
                "estimated error (blank: exact)",
                err,
                {"cmap": "inferno", "norm": LogNorm(1e-4, 1.0)},
            ),
        ]
        for ax, (title, data, kw) in zip(axes, panels):
            im = ax.imshow(data, aspect="auto", interpolation="nearest", **kw)
            ax.set_title(title)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            if "plan" in title:
                cb.set_ticks([0, 1, 2])
                cb.set_ticklabels(["exact", "fp8", "hybrid"])
        fig.suptitle(f"{self.model}: {self.tokens} tokens on {self.device}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    def save_heatmaps(self, path: str | Path) -> Path:
        """Write :meth:`heatmap_png` to ``path``; returns the path."""
        path = Path(path)
        path.write_bytes(self.heatmap_png())
        return path

    def save_html(self, path: str | Path, *, png: bytes | None = None) -> Path:
        """Write a self-contained HTML report (heatmaps embedded, per-layer table)."""
        path = Path(path)
        image = base64.b64encode(png if png is not None else self.heatmap_png()).decode()
        rows = []
        for layer in range(self.layers):
            modes = self.mode[layer]
            counts = ", ".join(f"{m}: {modes.count(m)}" for m in MODE_CODES if m in modes)
            ent = sum(self.entropy[layer]) / len(modes)
            er = sum(self.effective_rank[layer]) / len(modes)
            rows.append(
                f"<tr><td>{layer}</td><td>{ent:.3f}</td><td>{er:.1f}</td>"
                f"<td>{html.escape(counts)}</td><td>{max(self.estimated_error[layer]):.2e}</td>"
                f"<td>{sum(self.cost[layer]) / len(modes):.2f}</td></tr>"
            )

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        title = html.escape(self.model)
        policy = html.escape(str((self.config.get("policy") or {}).get("name", "active")))
        style = (
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
            "table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        )
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AdaAttn analysis: {title}</title>
<style>{style}</style>
</head><body>
<h1>AdaAttn analysis: {title}</h1>
<p>{self.tokens} tokens on {html.escape(self.device)}; {self.layers} layers × {self.heads} heads;
tolerance {self.config.get("tolerance")}; policy {policy}.</p>
<p>Perplexity exact {fmt(self.perplexity_exact)}, adaptive {fmt(self.perplexity_adaptive)};
output cosine {fmt(self.output_cosine)}; mean plan cost {self.mean_cost:.3f} × exact;
heads per mode {html.escape(json.dumps(self.mode_counts()))}.</p>
<img alt="per-layer, per-head heatmaps" src="data:image/png;base64,{image}" style="max-width:100%">
<h2>Per layer</h2>
<table><tr><th>layer</th><th>mean entropy</th><th>mean eff. rank</th><th>plans</th>
<th>max est. error</th><th>mean cost</th></tr>
{"".join(rows)}
</table></body></html>
"""
        path.write_text(page, encoding="utf-8")
        return path


class _Recorder(AdaAttnIntegration):
    """Integration that reports each layer call and can record the rows' effective rank.

    With ``measure`` it records the effective rank of sampled attention rows per layer.
    """

    def __init__(self, name: str, config: AdaAttnConfig, *, measure: bool) -> None:
        super().__init__(name, config)
        self.effective_rank: dict[int, list[float]] = {}
        self.on_layer: Callable[[], None] | None = None
        self.measure = measure

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
        out = super().__call__(
            module, query, key, value, attention_mask, scaling, dropout, **kwargs
        )
        layer = self.planner(module).layer_idx
        assert layer is not None
        if self.measure:
            with torch.no_grad():
                self.effective_rank[layer] = _sampled_effective_rank(
                    module, query, key, attention_mask, scaling, self.config,
                    kwargs.get("is_causal"),
                )  # fmt: skip
        if self.on_layer is not None:
            self.on_layer()
        return out


def _sampled_effective_rank(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    config: AdaAttnConfig,
    is_causal: bool | None,
) -> list[float]:
    """Effective rank per head of the attention rows of sampled queries (first batch entry)."""
    q, k = query[:1].float(), key[:1].float()
    hq, hk, seq_q, seq_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    rows = _backends.sample_rows(
        seq_q, min(config.sample_size, seq_q), torch.Generator().manual_seed(config.seed), q.device
    )
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    kq = k.repeat_interleave(hq // hk, dim=1)
    s = torch.matmul(q[:, :, rows], kq.transpose(-1, -2)) * scale
    if attention_mask is not None:
        m = attention_mask[:1].expand(1, hq, seq_q, seq_k)[:, :, rows]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and seq_q > 1:
        allowed = torch.arange(seq_k, device=q.device)[None, :] <= rows[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return [float(x) for x in _backends.effective_rank(p[0]).tolist()]


def analyze_model(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    config: AdaAttnConfig,
    max_tokens: int = 512,
    model_name: str = "model",
    progress: Callable[[str, int | None], Callable[[], None]] | None = None,
) -> AnalysisResult:
    """Run ``model`` on ``text`` with exact and adaptive attention and measure every head.

    Args:
        model: A transformers model (causal LM or encoder) whose attention uses
            ``AttentionInterface``; it is switched between AdaAttn implementations with
            ``set_attn_implementation`` and switched back to its implementation afterwards.
        tokenizer: Its tokenizer.
        text: The text; the first ``max_tokens`` tokens are used.
        config: The adaptive config to plan with (its ``replan`` is ignored: one plan per
            layer for this text).
        max_tokens: Tokens to analyse (≥ 2).
        model_name: Label for reports.
        progress: Optional ``progress(stage, total) -> advance`` callback factory (the CLI
            passes rich progress bars); ``advance()`` is called once per layer.

    Returns:
        The :class:`AnalysisResult`.

    Raises:
        ValueError: ``text`` gives fewer than 2 tokens, or ``max_tokens < 2``.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    ids = enc["input_ids"][:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("text must give at least 2 tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    n_layers = int(getattr(model.config, "num_hidden_layers", 0)) or None
    causal_lm = hasattr(model, "lm_head") or "CausalLM" in type(model).__name__

    exact_rec = _Recorder(_EXACT_NAME, AdaAttnConfig(), measure=False)
    recorder = _Recorder(_ADAPTIVE_NAME, config.replace(replan="every_call"), measure=True)
    for integration in (exact_rec, recorder):
        register(integration.name, integration=integration)

    def run(name: str, stage: str) -> Any:
        model.set_attn_implementation(name)
        rec = recorder if name == _ADAPTIVE_NAME else exact_rec
        rec.on_layer = progress(stage, n_layers) if progress is not None else None
        with torch.no_grad():
            if causal_lm:
                out = model(input_ids=ids, labels=ids, output_hidden_states=True)
            else:
                out = model(input_ids=ids, output_hidden_states=True)
        rec.on_layer = None
        return out

    previous = getattr(model.config, "_attn_implementation", None)
    exact = run(_EXACT_NAME, "exact pass")
    adaptive = run(_ADAPTIVE_NAME, "adaptive pass (planning every layer)")
    if previous:
        model.set_attn_implementation(previous)

    result = AnalysisResult(
        model=model_name, tokens=int(ids.shape[1]), device=str(device), config=config.to_dict()
    )
    planners = recorder.planners(model)
    for layer, planner in planners.items():
        plan = planner.last_plan
        assert plan is not None
        result.entropy.append(
            [h.entropy if h.entropy is not None else math.nan for h in plan.heads]
        )
        result.mode.append([h.mode for h in plan.heads])
        result.estimated_error.append([h.estimated_error for h in plan.heads])
        result.window.append([h.window or 0 for h in plan.heads])
        result.rank.append([h.rank or 0 for h in plan.heads])
        result.cost.append([h.cost for h in plan.heads])
        result.effective_rank.append(
            recorder.effective_rank.get(layer, [math.nan] * len(plan.heads))
        )
    if causal_lm:
        result.perplexity_exact = math.exp(float(exact.loss))
        result.perplexity_adaptive = math.exp(float(adaptive.loss))
    a = exact.hidden_states[-1].float().flatten(0, -2)
    b = adaptive.hidden_states[-1].float().flatten(0, -2)
    result.output_cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    return result
