"""Benchmark AdaAttn's dense Triton flash attention against SDPA backends and FlexAttention.

Run from the repository root on a CUDA machine::

    python -m tools.bench.bench_flash            # full grid of /work/shared/ANCHORS.md
    python -m tools.bench.bench_flash --quick    # seq 4096 and 8192 only
    python -m tools.bench.bench_flash --plot     # redraw results/flash.png from results/flash.json

FlexAttention is compiled once per shape, at ``--flex-seqs`` (default 8192, as in the anchors)
to bound compile time.

Grid: head_dim 64/128, causal and not, seq 1k–16k, batch·seq = 16k tokens, heads·head_dim =
2048, bf16. Forward and backward medians via ``triton.testing.do_bench``; TFLOP/s counts
4·b·h·s²·d per forward (halved when causal) and 2.5× that for the backward. Every method's
output (and, for ours and SDPA flash, the gradients) is checked on the benchmarked data against
a float64 reference on a slice (batch 0, two heads). Peak memory of forward+backward at the
largest sequence length is compared with SDPA flash. Writes ``results/flash.json`` and
``results/flash.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tools.bench.common import RESULTS, median_ms, rel_error, write_results

TOKENS = 16384
WIDTH = 2048


def _sdpa(backend: Any, causal: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _methods(causal: bool, shape: tuple[int, int, int, int], flex: bool) -> dict[str, Any]:
    import adaattn_kernels
    from torch.nn.attention import SDPBackend

    m: dict[str, Any] = {
        "adaattn": lambda q, k, v: adaattn_kernels.attention(q, k, v, causal=causal),
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION, causal),
        "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, causal),
        "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION, causal),
    }
    if flex:
        # One compile per shape (and per requires_grad): lift dynamo's recompile cap so later
        # shapes do not silently fall back to the unfused (O(S²) memory) implementation.
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        compiled = torch.compile(flex_attention, dynamic=False)
        s = shape[2]
        block_mask = None
        if causal:
            block_mask = create_block_mask(
                lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device="cuda"
            )
        m["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    return m


def _reference_slice(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool
) -> dict[str, torch.Tensor]:
    """Float64 output and gradients for batch 0, heads 0–1."""
    import adaattn_kernels

    qs, ks, vs = (t[:1, :2].detach().double().requires_grad_() for t in (q, k, v))
    out = adaattn_kernels.attention_reference(qs, ks, vs, causal=causal)
    out.backward(do[:1, :2].double())
    return {"out": out.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}


def run_case(
    d: int, causal: bool, seq: int, *, flex: bool, backward: bool, memory: bool
) -> list[dict[str, Any]]:
    b, h = max(1, TOKENS // seq), WIDTH // d
    torch.manual_seed(seq + d + int(causal))
    q, k, v = (torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    flops = 4.0 * b * h * seq * seq * d * (0.5 if causal else 1.0)
    ref = _reference_slice(q, k, v, do, causal)
    rows: list[dict[str, Any]] = []
    methods = _methods(causal, (b, h, seq, d), flex)
    cudnn_out = None
    with contextlib.suppress(RuntimeError):
        cudnn_out = methods["sdpa_cudnn"](q, k, v)
    for name, fn in methods.items():
        row: dict[str, Any] = {
            "method": name,
            "head_dim": d,
            "causal": causal,
            "seq": seq,
            "batch": b,
            "heads": h,
        }
        try:
            out = fn(q, k, v)
            torch.cuda.synchronize()
        except Exception as exc:  # a backend may not support this shape / card
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(f"  {name:15s} unavailable: {row['error'][:80]}", flush=True)
            continue
        row["rel_err_fwd_f64"] = rel_error(out[:1, :2], ref["out"])
        if cudnn_out is not None:
            row["rel_err_fwd_vs_cudnn"] = rel_error(out, cudnn_out)
        ms = median_ms(lambda fn=fn: fn(q, k, v))
        row["fwd_ms"] = ms
        row["fwd_tflops"] = flops / ms * 1e-9
        if backward:
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            try:
                out_g = fn(qg, kg, vg)
                out_g.backward(do, retain_graph=True)
                torch.cuda.synchronize()
                for gname, g in (("dq", qg.grad), ("dk", kg.grad), ("dv", vg.grad)):
                    row[f"rel_err_{gname}_f64"] = rel_error(g[:1, :2], ref[gname])
                from triton.testing import do_bench

                bms = float(
                    do_bench(
                        lambda out_g=out_g: out_g.backward(do, retain_graph=True),
                        grad_to_none=[qg, kg, vg],
                        return_mode="median",
                    )
                )
                row["bwd_ms"] = bms
                row["bwd_tflops"] = 2.5 * flops / bms * 1e-9
            except Exception as exc:
                row["bwd_error"] = f"{type(exc).__name__}: {exc}"[:300]
            del qg, kg, vg
        if memory and name in ("adaattn", "sdpa_flash", "sdpa_cudnn"):
            row["peak_mem_fwd_bwd_bytes"] = _peak_memory(fn, q, k, v, do)
        rows.append(row)
        print(
            f"  {name:15s} fwd {row.get('fwd_tflops', 0):6.1f} TF/s "
            f"bwd {row.get('bwd_tflops', 0):6.1f} TF/s err {row['rel_err_fwd_f64']:.2e}",
            flush=True,
        )
    return rows


def _peak_memory(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
) -> int:
    """Extra bytes allocated at peak by one forward+backward (inputs excluded)."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(qg, kg, vg)
    out.backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del qg, kg, vg, out
    return int(peak)


def tuned_configs() -> dict[str, dict[str, str]]:
    """The configs the autotuner picked for each key of each of our kernels."""
    from adaattn_kernels.flash import _triton_kernels as tk

    out: dict[str, dict[str, str]] = {}
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        cache = getattr(getattr(tk, name), "cache", {})
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of ours to each peer, per case."""
    out = []
    cases = sorted({(r["head_dim"], r["causal"], r["seq"]) for r in rows})
    for d, c, s in cases:
        by = {r["method"]: r for r in rows if (r["head_dim"], r["causal"], r["seq"]) == (d, c, s)}
        ours = by.get("adaattn", {})
        entry: dict[str, Any] = {"head_dim": d, "causal": c, "seq": s}
        for peer in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"):
            p = by.get(peer, {})
            for key in ("fwd_tflops", "bwd_tflops"):
                if key in ours and key in p:
                    entry[f"{key.split('_')[0]}_vs_{peer}"] = ours[key] / p[key]
            if "peak_mem_fwd_bwd_bytes" in ours and "peak_mem_fwd_bwd_bytes" in p:
                entry[f"mem_vs_{peer}"] = ours["peak_mem_fwd_bwd_bytes"] / max(
                    1, p["peak_mem_fwd_bwd_bytes"]
                )
        out.append(entry)
    return out


def plot(path: Any = None) -> None:
    """Draw results/flash.png (forward and backward TFLOP/s per method) from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS / "flash.json"
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    cases = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 7), squeeze=False)
    for j, (d, c) in enumerate(cases):
        for i, key in enumerate(("fwd_tflops", "bwd_tflops")):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted(
                    (r["seq"], r[key])
                    for r in rows
                    if r["method"] == method and (r["head_dim"], r["causal"]) == (d, c) and key in r
                )
                if pts:
                    ax.plot(
                        *zip(*pts),
                        marker="o",
                        label=method,
                        linewidth=2.5 if method == "adaattn" else 1.2,
                    )
            ax.set_xscale("log", base=2)
            ax.set_title(
                f"{'forward' if i == 0 else 'backward'}, d={d}, {'causal' if c else 'full'}"
            )
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    env = data.get("environment", {})
    fig.suptitle(
        f"bf16 attention, {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}"
    )
    fig.tight_layout()
    out = RESULTS / "flash.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 4096 and 8192 only")
    ap.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths")
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compile time)")
    ap.add_argument(
        "--flex-seqs",
        type=int,
        nargs="*",
        default=[8192],
        help="lengths at which FlexAttention runs (one compile per shape)",
    )
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--plot", action="store_true", help="only redraw the plot from the JSON")
    args = ap.parse_args(argv)
    if args.plot:
        plot()
        return 0
    if not torch.cuda.is_available():
        print("bench_flash needs a CUDA GPU", file=sys.stderr)
        return 1
    seqs = args.seqs or ([4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384])
    rows: list[dict[str, Any]] = []
    for d in args.head_dims:
        for causal in (False, True):
            for s in seqs:
                print(f"head_dim {d} causal {causal} seq {s}", flush=True)
                rows += run_case(
                    d,
                    causal,
                    s,
                    flex=not args.no_flex and s in args.flex_seqs,
                    backward=not args.no_backward,
                    memory=s == max(seqs),
                )
                torch.cuda.empty_cache()
                write_results("flash", rows, partial=True)  # keep what ran if time runs out
    summary = summarize(rows)
    write_results("flash", rows, summary=summary, tuned_configs=tuned_configs())
    for e in summary:
        print(
            " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items())
        )
    try:
        plot()
    except Exception as exc:  # plotting is optional on the GPU box
        print(f"plot skipped: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
