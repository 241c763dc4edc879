"""Error of hybrid attention vs (window w, rank r) on synthetic diffuse heads and real heads.

    python tools/hybrid_error_study.py [--qkv '.carry/qkv/smollm2_L*.pt'] [--seq 8192]

For every source (synthetic heads, then each captured SmolLM2 layer from ``--qkv``, a glob of
``tools/capture_qkv.py`` files), every ``(w, r)`` of the grid and every head, it records

* ``true``: ``‖Õ − O‖_F / ‖O‖_F`` over all query rows (PyTorch reference, float32, causal);
* ``estimate``: :func:`adaattn_kernels.hybrid.estimate_hybrid_error` on ``--samples`` rows;
* ``predicted``: :func:`adaattn_kernels.hybrid.predict_hybrid_error` (scores only);

and writes ``results/hybrid_error.json`` (per-head rows + a per-(source, w, r) summary table) and
``results/hybrid_error.png`` (median error vs r per w, one panel per source; estimator scatter).
The acceptance check — estimate ≥ true/2 (within 2× or above) on ≥ 95% of (head, plan) pairs —
is computed over all sources and reported in the JSON and on stdout. Runs on CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for _pkg in ("adaattn-precision", "adaattn-kernels"):
    _src = str(REPO / "packages" / _pkg / "src")
    if _src not in sys.path:
        sys.path.insert(0, _src)

from adaattn_kernels import attention_reference  # noqa: E402
from adaattn_kernels.hybrid import (  # noqa: E402
    HybridPlan,
    estimate_hybrid_error,
    hybrid_attention_reference,
    predict_hybrid_error,
)

RESULTS = Path(os.environ.get("ADAATTN_RESULTS", REPO / "results"))
WINDOWS = (64, 256, 512, 1024)
RANK_DIVISORS = (256, 64, 16, 4)  # r = S / divisor → segment sizes 256, 64, 16, 4
SINKS = 4


def synthetic_heads(seq: int, heads: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    """Diffuse heads: keys vary smoothly along the sequence, queries with graded temperature.

    Keys are a moving average (window 128) of Gaussian noise plus a small i.i.d. part, so scores
    are nearly flat within short segments of the far field; query norms grow across heads
    (inverse temperature 0.1…1), from very diffuse to moderately peaked. Values are a per-head
    mean vector plus i.i.d. noise of the same scale: like real heads, whose values share a large
    common component, so ‖O‖ does not shrink to 0 as attention spreads out.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, heads, seq + 127, d, generator=g)
    smooth = noise.unfold(2, 128, 1).mean(-1) * math.sqrt(128)  # (1, H, S, d), unit variance
    k = smooth + 0.2 * torch.randn(1, heads, seq, d, generator=g)
    temps = torch.linspace(0.1, 1.0, heads)[None, :, None, None]
    q = torch.randn(1, heads, seq, d, generator=g) * temps
    v = torch.randn(1, heads, 1, d, generator=g) + torch.randn(1, heads, seq, d, generator=g)
    return {"q": q.half(), "k": k.half(), "v": v.half(), "source": "synthetic"}


def rel_err_per_head(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    diff = (out.double() - ref.double()).square().sum((-1, -2))
    return (diff / ref.double().square().sum((-1, -2)).clamp_min(1e-300)).sqrt()[0]


def study_source(
    name: str, qkv: dict[str, Any], seq: int, samples: int, seed: int
) -> list[dict[str, Any]]:
    q, k, v = (qkv[n][:, :, :seq].float() for n in ("q", "k", "v"))
    s = q.shape[2]
    heads = q.shape[1]
    exact = attention_reference(q, k, v, causal=True)
    ranks = [max(1, s // dv) for dv in RANK_DIVISORS]
    pred = predict_hybrid_error(
        q, k, v, windows=WINDOWS, ranks=ranks, sinks=SINKS, causal=True, num_samples=samples,
        generator=torch.Generator().manual_seed(seed + 1),
    )  # fmt: skip
    rows = []
    for a, w in enumerate(WINDOWS):
        for c, r in enumerate(ranks):
            t0 = time.time()
            plan = HybridPlan.uniform(1, heads, seq_len_k=s, window=w, rank=r, sinks=SINKS)
            hyb = hybrid_attention_reference(q, k, v, plan, causal=True)
            true = rel_err_per_head(hyb, exact)
            est = estimate_hybrid_error(
                q, k, v, plan, causal=True, num_samples=samples,
                generator=torch.Generator().manual_seed(seed + 1000 * a + c),
            )[0]  # fmt: skip
            for h in range(heads):
                rows.append(
                    {
                        "source": name, "seq": s, "head": h, "window": w, "rank": r,
                        "segment": math.ceil(s / r), "sinks": SINKS,
                        "true": float(true[h]), "estimate": float(est[h]),
                        "predicted": float(pred.error[0, h, a, c]),
                        "far_mass": float(pred.far_mass[0, h, a, c]),
                        "entropy": float(pred.entropy[0, h]),
                    }
                )  # fmt: skip
            print(
                f"{name:>12} w={w:5d} r={r:5d}: median true {true.median():.4f} "
                f"max {true.max():.4f} ({time.time() - t0:.1f}s)",
                flush=True,
            )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    keys = sorted({(r["source"], r["window"], r["rank"]) for r in rows}, key=lambda t: t)
    for src, w, rk in keys:
        sel = [r for r in rows if (r["source"], r["window"], r["rank"]) == (src, w, rk)]
        true = torch.tensor([r["true"] for r in sel])
        est = torch.tensor([r["estimate"] for r in sel])
        table.append(
            {
                "source": src, "window": w, "rank": rk, "heads": len(sel),
                "true_median": float(true.median()), "true_max": float(true.max()),
                "frac_heads_below_1pct": float((true < 0.01).double().mean()),
                "frac_heads_below_5pct": float((true < 0.05).double().mean()),
                "estimate_ok_frac": float((est >= true / 2).double().mean()),
            }
        )  # fmt: skip
    return table


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(1, len(sources) + 1, figsize=(4.2 * (len(sources) + 1), 3.8))
    for ax, src in zip(axes, sources):
        for w in WINDOWS:
            sel = [r for r in rows if r["source"] == src and r["window"] == w]
            ranks = sorted({r["rank"] for r in sel})
            med = [
                float(torch.tensor([r["true"] for r in sel if r["rank"] == rk]).median())
                for rk in ranks
            ]
            ax.plot(ranks, med, marker="o", label=f"w={w}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank r (pooled segments)")
        ax.set_title(src)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median relative error over heads")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    true = torch.tensor([r["true"] for r in rows]).clamp_min(1e-6)
    for key, mk in (("estimate", "o"), ("predicted", "x")):
        ax.scatter(true, torch.tensor([r[key] for r in rows]).clamp_min(1e-6), s=6, marker=mk,
                   alpha=0.5, label=key)  # fmt: skip
    lo, hi = float(true.min()), float(true.max())
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot([lo, hi], [lo / 2, hi / 2], "k--", lw=0.8, label="true/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true error")
    ax.set_ylabel("sampled / predicted")
    ax.set_title("estimator vs truth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qkv", default=str(REPO / ".carry/qkv/smollm2_L*.pt"),
                    help="glob of captured q/k/v files (tools/capture_qkv.py)")  # fmt: skip
    ap.add_argument(
        "--seq",
        type=int,
        default=4096,
        help="use the first SEQ tokens of each capture (a causal prefix is exact)",
    )
    ap.add_argument("--synthetic-seq", type=int, default=4096)
    ap.add_argument("--synthetic-heads", type=int, default=8)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sources: list[tuple[str, dict[str, Any]]] = [
        ("synthetic", synthetic_heads(args.synthetic_seq, args.synthetic_heads, 64, args.seed))
    ]
    files = sorted(glob.glob(args.qkv))
    for f in files:
        data = torch.load(f, map_location="cpu")
        sources.append((f"smollm2_L{int(data['layer']):02d}", data))
    if not files:
        print(f"no q/k/v captures match {args.qkv!r}: synthetic heads only", flush=True)

    rows: list[dict[str, Any]] = []
    meta = []
    for name, data in sources:
        seq = args.synthetic_seq if name == "synthetic" else args.seq
        rows += study_source(name, data, seq, args.samples, args.seed)
        meta.append(
            {
                "source": name, "origin": str(data.get("source", "")),
                "model": str(data.get("model", "")), "seq": min(seq, data["q"].shape[2]),
                "heads_q": int(data["q"].shape[1]), "heads_kv": int(data["k"].shape[1]),
            }
        )  # fmt: skip

    true = torch.tensor([r["true"] for r in rows])
    est = torch.tensor([r["estimate"] for r in rows])
    pred = torch.tensor([r["predicted"] for r in rows])
    ok = est >= true / 2
    within = ok & (est <= 2 * true)
    acceptance = {
        "criterion": "estimate >= true/2 (within 2x or above) on >= 95% of (head, plan) pairs",
        "estimate_ok_frac": float(ok.double().mean()),
        "estimate_within_2x_frac": float(within.double().mean()),
        "pass": bool(ok.double().mean() >= 0.95),
        "pairs": len(rows),
        "predictor_spearman": spearman(pred, true),
        "predictor_within_2x_frac": float(
            ((pred >= true / 2) & (pred <= 2 * true)).double().mean()
        ),
    }
    sys.path.insert(0, str(REPO))
    from tools.bench.common import environment

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hybrid_error.json"
    payload = {
        "name": "hybrid_error", "environment": environment(), "sources": meta,
        "windows": list(WINDOWS), "rank_divisors": list(RANK_DIVISORS), "sinks": SINKS,
        "samples": args.samples, "causal": True, "acceptance": acceptance,
        "table": summarize(rows), "rows": rows,
    }  # fmt: skip
    out.write_text(json.dumps(payload, indent=1) + "\n")
    plot(rows, RESULTS / "hybrid_error.png")
    print(json.dumps(acceptance, indent=2))
    print(f"wrote {out} and {RESULTS / 'hybrid_error.png'}")


if __name__ == "__main__":
    main()
