"""Sweep tile configs / TMA of the dense flash kernels on one GPU, next to SDPA, in one process.

    python -m tools.bench.tune_flash [--seq 8192] [--head-dims 64 128]

For each (head_dim, causal) it times SDPA flash and cuDNN, then our forward with every candidate
config, with and without TMA descriptors and with each ``exp2`` mode (``--exp2 mufu split
poly``), then the backward kernels (dK/dV and dQ) per config.
Each variant's output is checked against cuDNN before it is timed. Prints a table and writes
``results/tune_flash.json``. Used to choose the autotune lists in ``_triton_kernels.py``.
"""

# The timed lambdas run inside the iteration that defines them.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import triton
from adaattn_kernels._triton import clear_replays
from triton.testing import do_bench

from tools.bench.common import rel_error, write_results

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (256, 64, 16, 3),
]
DKDV = [
    (64, 128, 8, 2),
    (64, 128, 8, 3),
    (32, 128, 4, 4),
    (32, 128, 8, 3),
    (64, 64, 4, 3),
    (32, 64, 4, 4),
]
DQ = [
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 4, 4),
    (128, 32, 8, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
]


def _force(kernel: Any, cfg: tuple[int, int, int, int], pre_hook: Any = None) -> None:
    bm, bn, w, s = cfg
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    kernel.configs = [triton.Config(meta, num_warps=w, num_stages=s, pre_hook=pre_hook)]
    kernel.cache = {}
    clear_replays()  # the launchers would otherwise replay the binary of the previous config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--tma", nargs="*", default=["0"], help="TMA settings to sweep ('0', '1')")
    ap.add_argument(
        "--exp2",
        nargs="*",
        default=["mufu"],
        help="forward exp2 modes to sweep (ADAATTN_FLASH_EXP2: mufu, split, poly)",
    )
    ap.add_argument("--fwd-top", type=int, default=len(FWD), help="only the first N fwd configs")
    args = ap.parse_args()

    import adaattn_kernels
    from adaattn_kernels.flash import _triton_kernels as tk
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    rows: list[dict[str, Any]] = []
    s = args.seq
    for d in args.head_dims:
        b, h = max(1, 16384 // s), 2048 // d
        for causal in (False, True):
            torch.manual_seed(d + s)
            q, k, v = (
                torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            do = torch.randn_like(q)
            flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
            tag = f"d={d} causal={causal} s={s}"

            def peer(backend: Any) -> tuple[float, float, torch.Tensor]:
                with sdpa_kernel([backend]):
                    out = sdpa(q, k, v, is_causal=causal)
                    f = do_bench(lambda: sdpa(q, k, v, is_causal=causal), return_mode="median")
                    q.grad = k.grad = v.grad = None
                    out.backward(do, retain_graph=True)
                    grads[backend] = [t.grad.clone() for t in (q, k, v)]
                    bw = do_bench(
                        lambda: out.backward(do, retain_graph=True),
                        grad_to_none=[q, k, v],
                        return_mode="median",
                    )
                return flops / f * 1e-9, 2.5 * flops / bw * 1e-9, out.detach()

            grads: dict[Any, list[torch.Tensor]] = {}

            f_fl, b_fl, _ = peer(SDPBackend.FLASH_ATTENTION)
            f_cu, b_cu, ref = peer(SDPBackend.CUDNN_ATTENTION)
            print(
                f"{tag}: sdpa_flash fwd {f_fl:.0f} bwd {b_fl:.0f} | cudnn fwd {f_cu:.0f} "
                f"bwd {b_cu:.0f}",
                flush=True,
            )
            rows.append(
                {
                    "d": d,
                    "causal": causal,
                    "seq": s,
                    "method": "sdpa_flash",
                    "fwd": f_fl,
                    "bwd": b_fl,
                }
            )
            rows.append(
                {
                    "d": d,
                    "causal": causal,
                    "seq": s,
                    "method": "sdpa_cudnn",
                    "fwd": f_cu,
                    "bwd": b_cu,
                }
            )
            for tma, exp2 in [(t, e) for t in args.tma for e in args.exp2]:
                os.environ["ADAATTN_FLASH_TMA"] = tma
                os.environ["ADAATTN_FLASH_EXP2"] = exp2
                for cfg in FWD[: args.fwd_top]:
                    _force(tk._fwd_kernel, cfg, tk._set_kv_block)
                    try:
                        fn = lambda: adaattn_kernels.attention(q, k, v, causal=causal)
                        with torch.no_grad():
                            err = rel_error(fn(), ref)
                            t = do_bench(fn, return_mode="median")
                    except Exception as exc:
                        print(
                            f"  fwd tma={tma} exp2={exp2} {cfg}: FAILED "
                            f"{type(exc).__name__}: {str(exc)[:100]}",
                            flush=True,
                        )
                        continue
                    tf = flops / t * 1e-9
                    rows.append(
                        {
                            "d": d,
                            "causal": causal,
                            "seq": s,
                            "kernel": "fwd",
                            "tma": tma,
                            "exp2": exp2,
                            "cfg": cfg,
                            "tflops": tf,
                            "err": err,
                        }
                    )
                    print(
                        f"  fwd tma={tma} exp2={exp2} {cfg}: {tf:.0f} TF/s "
                        f"({tf / f_cu:.2f}x cudnn, {tf / f_fl:.2f}x flash) err {err:.1e}",
                        flush=True,
                    )
            os.environ["ADAATTN_FLASH_TMA"] = "1"
            best_fwd = max(
                (
                    r
                    for r in rows
                    if r.get("kernel") == "fwd" and r["d"] == d and r["causal"] == causal
                ),
                key=lambda r: r["tflops"],
            )
            os.environ["ADAATTN_FLASH_TMA"] = best_fwd["tma"]
            os.environ["ADAATTN_FLASH_EXP2"] = best_fwd["exp2"]
            _force(tk._fwd_kernel, best_fwd["cfg"], tk._set_kv_block)
            if args.no_backward:
                continue
            out = adaattn_kernels.attention(q, k, v, causal=causal)
            # dK/dV and dQ variants, the other kernel held at its first config.
            for kname, cfgs, other, other_cfg in (
                ("dkdv", DKDV, tk._bwd_dq_kernel, DQ[0]),
                ("dq", DQ, tk._bwd_dkdv_kernel, DKDV[0]),
            ):
                kern = tk._bwd_dkdv_kernel if kname == "dkdv" else tk._bwd_dq_kernel
                _force(other, other_cfg)
                for cfg in cfgs:
                    _force(kern, cfg)
                    try:
                        q.grad = k.grad = v.grad = None
                        out.backward(do, retain_graph=True)
                        gerr = max(
                            rel_error(t.grad, g)
                            for t, g in zip((q, k, v), grads[SDPBackend.CUDNN_ATTENTION])
                        )
                        t = do_bench(
                            lambda: out.backward(do, retain_graph=True),
                            grad_to_none=[q, k, v],
                            return_mode="median",
                        )
                    except Exception as exc:
                        print(
                            f"  {kname} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:100]}",
                            flush=True,
                        )
                        continue
                    tf = 2.5 * flops / t * 1e-9
                    rows.append(
                        {
                            "d": d,
                            "causal": causal,
                            "seq": s,
                            "kernel": kname,
                            "cfg": cfg,
                            "bwd_tflops": tf,
                            "bwd_ms": t,
                            "grad_err": gerr,
                        }
                    )
                    print(
                        f"  bwd[{kname} varied] {cfg}: {tf:.0f} TF/s "
                        f"({tf / b_fl:.2f}x flash, {tf / b_cu:.2f}x cudnn) "
                        f"grad err vs cudnn {gerr:.1e}",
                        flush=True,
                    )
    write_results("tune_flash", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
