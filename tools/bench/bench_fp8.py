"""8-bit attention forward (int8 / FP8 Q·Kᵀ) vs SDPA (cuDNN, flash) bf16 and SageAttention.

    python -m tools.bench.bench_fp8            # the ANCHORS grid, writes results/fp8.json
    python -m tools.bench.bench_fp8 --quick    # one shape per head_dim (smoke test)

Methods: ``fp8`` / ``fp8_pv16`` (e4m3 Q·Kᵀ; P·V e4m3 / 16-bit), ``int8`` / ``int8_pv16`` (int8
Q·Kᵀ with int32 accumulation, the op's default ``qk_dtype``), ``int8_qtok_pv16`` (int8 with
per-token Q scales, ``granularity="q_token"``), ``int8_pv16_hi16`` (int8 with the 16 outlier
channels in 16-bit, ``outlier_channels=16``), SDPA cuDNN and flash (bf16), SageAttention 1
(``sage1``, fp16) — all in the same process and run.

Grid (shared/ANCHORS.md): batch × seq = 16k tokens, heads × head_dim = 2048, head_dim 64/128,
causal or not, seq 1k–16k. TFLOP/s use 4·b·h·s²·d FLOPs, halved when causal. Timings include
the quantisation (the op takes bf16 and returns bf16). Accuracy: relative Frobenius error and
cosine vs float64 on two heads of the first batch, for N(0,1) inputs ("normal") and
heavy-tailed ones ("outlier": K with a per-channel offset of 8σ, Q with four 20× channels);
SageAttention gets the same inputs in fp16. Results are ratios within this run only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tools.bench.common import environment, median_ms, write_results

TOKENS = 16384
WIDTH = 2048
SEQS = (1024, 4096, 8192, 16384)
#: Our methods (the keys of ``methods`` in :func:`main` that run adaattn's op).
OURS = ("fp8", "fp8_pv16", "int8", "int8_pv16", "int8_qtok_pv16", "int8_pv16_hi16")


def _sage() -> tuple[Callable[..., torch.Tensor] | None, str]:
    try:
        from sageattention import sageattn
    except ImportError as exc:
        return None, f"not installed ({exc})"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return sageattn, version("sageattention")
    except PackageNotFoundError:
        return sageattn, "installed (version unknown)"


def _sdpa(backend: Any) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _inputs(b: int, h: int, s: int, d: int, kind: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=g) for _ in range(3))
    if kind == "outlier":
        k = k + 8.0 * torch.randn(1, 1, 1, d, device="cuda", generator=g)
        q[..., torch.randperm(d, device="cuda", generator=g)[:4]] *= 20.0
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """float64 attention on heads 0–1 of batch 0 (the whole sequence)."""
    from adaattn_kernels import attention_reference

    q2, k2, v2 = (t[:1, :2].double() for t in (q, k, v))
    return attention_reference(q2, k2, v2, causal=causal)


def _accuracy(
    fn: Callable[..., torch.Tensor], q, k, v, causal: bool, fp16: bool, exact: torch.Tensor
) -> dict:
    """rel error / cosine of ``fn`` vs ``exact`` on heads 0–1 of batch 0."""
    q2, k2, v2 = (t[:1, :2].contiguous() for t in (q, k, v))
    if fp16:
        q2, k2, v2 = q2.half(), k2.half(), v2.half()
    with torch.no_grad():
        out = fn(q2, k2, v2, causal).double()
    diff = (out - exact).norm() / exact.norm()
    cos = (out.flatten() @ exact.flatten()) / (out.norm() * exact.norm())
    return {"relerr": float(diff), "cos": float(cos), "finite": bool(torch.isfinite(out).all())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per head_dim")
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA GPU", file=sys.stderr)
        return 2
    from adaattn_kernels.fp8 import fp8_attention
    from adaattn_precision import detect
    from torch.nn.attention import SDPBackend

    if not detect("cuda").fp8_e4m3:
        print("this GPU has no FP8 e4m3 tensor cores", file=sys.stderr)
        return 2
    sageattn, sage_status = _sage()

    def _ours(**opts: Any) -> Callable[..., torch.Tensor]:
        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: bool) -> torch.Tensor:
            out = fp8_attention(q, k, v, causal=c, **opts)
            assert isinstance(out, torch.Tensor)
            return out

        return fn

    methods: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
        "fp8": (_ours(qk_dtype="fp8"), False),
        "fp8_pv16": (_ours(qk_dtype="fp8", pv_dtype="fp16"), False),
        "int8": (_ours(qk_dtype="int8"), False),
        "int8_pv16": (_ours(qk_dtype="int8", pv_dtype="fp16"), False),
        "int8_qtok_pv16": (_ours(qk_dtype="int8", pv_dtype="fp16", granularity="q_token"), False),
        "int8_pv16_hi16": (_ours(qk_dtype="int8", pv_dtype="fp16", outlier_channels=16), False),
        "cudnn": (_sdpa(SDPBackend.CUDNN_ATTENTION), False),
        "flash": (_sdpa(SDPBackend.FLASH_ATTENTION), False),
    }
    if sageattn is not None:
        methods["sage1"] = (
            lambda q, k, v, c: sageattn(q, k, v, tensor_layout="HND", is_causal=c),
            True,
        )
    seqs = args.seqs or ((4096,) if args.quick else SEQS)
    rows: list[dict[str, Any]] = []
    for d in args.head_dims:
        for causal in (False, True):
            for s in seqs:
                b, h = TOKENS // s, WIDTH // d
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                row: dict[str, Any] = {"d": d, "causal": causal, "s": s, "b": b, "h": h}
                q, k, v = _inputs(b, h, s, d, "normal", seed=s + d)
                qh, kh, vh = q.half(), k.half(), v.half()
                # Accuracy inputs: two heads are enough; the float64 reference is computed once.
                probes = {}
                for kind in ("normal", "outlier"):
                    qq, kk, vv = _inputs(1, 2, s, d, kind, seed=s + d + 1)
                    probes[kind] = (qq, kk, vv, _exact(qq, kk, vv, causal))
                for name, (fn, fp16) in methods.items():
                    a, bb, c = (qh, kh, vh) if fp16 else (q, k, v)
                    try:
                        with torch.no_grad():
                            ms = median_ms(lambda fn=fn, a=a, bb=bb, c=c, z=causal: fn(a, bb, c, z))
                        row[name] = round(flops / ms / 1e9, 1)
                        for kind, (qq, kk, vv, exact) in probes.items():
                            acc = _accuracy(fn, qq, kk, vv, causal, fp16, exact)
                            row[f"{name}_{kind}_relerr"] = acc["relerr"]
                            row[f"{name}_{kind}_cos"] = acc["cos"]
                            row[f"{name}_{kind}_finite"] = acc["finite"]
                    except (RuntimeError, ValueError) as exc:  # a backend refusing a shape
                        row[name] = None
                        row[f"{name}_error"] = str(exc).splitlines()[0][:200]
                for name in OURS:
                    for peer in ("cudnn", "flash", "sage1"):
                        if row.get(name) and row.get(peer):
                            row[f"{name}_vs_{peer}"] = round(row[name] / row[peer], 3)
                print(
                    f"d={d} causal={causal!s:5} s={s:5}  "
                    + "  ".join(f"{n}={row.get(n)}" for n in methods)
                    + f"  fp8/cudnn={row.get('fp8_vs_cudnn')}"
                    + f"  int8_pv16/cudnn={row.get('int8_pv16_vs_cudnn')}"
                    + f"  err fp8={row.get('fp8_normal_relerr', float('nan')):.3g}"
                    + f" int8_pv16={row.get('int8_pv16_normal_relerr', float('nan')):.3g}"
                    + f" sage={row.get('sage1_normal_relerr', float('nan')):.3g}",
                    flush=True,
                )
                rows.append(row)
                write_results("fp8", rows, partial=True)  # keep what ran if time runs out
                del q, k, v, qh, kh, vh, probes
                torch.cuda.empty_cache()
    # The acceptance ratios (shared/ANCHORS.md): head_dim 128, seq >= 4096, worst case.
    targets = {}
    for name in OURS:
        for peer, goal in (("cudnn", 1.3), ("sage1", 1.5)):
            vals = [r.get(f"{name}_vs_{peer}") for r in rows if r["d"] == 128 and r["s"] >= 4096]
            vals = [x for x in vals if x is not None]
            targets[f"{name}_vs_{peer}"] = {
                "goal": goal,
                "min": min(vals) if vals else None,
                "met": bool(vals) and min(vals) >= goal,
            }
    print("targets (d=128, seq>=4096, worst case):", targets)
    env = environment()
    write_results("fp8", rows, sageattention=sage_status, device=env.get("device"), targets=targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
