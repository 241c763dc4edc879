"""Host (CPU) time per call of the attention entry points, and where it goes (cProfile).

    python -m tools.bench.profile_host [--qkv .carry/qkv/smollm2_L03.pt] [--top 25]

A call whose host time exceeds its GPU time is launch-bound: the GPU waits for Python. For each
case this prints the eager time (median, CUDA events), the GPU time alone (CUDA-graph replay),
the host time per call (50 calls enqueued back to back, no synchronisation between them) with
replay of compiled kernels on (the default, ``adaattn_kernels._triton.KernelLauncher``) and off
(Triton's own launch path), and the functions with the most own time over 200 calls.
Cases (bf16, causal): the dense kernel and the hybrid kernel (all-hybrid and
half/half plans) at 16 heads x 8192 x 64, and, with ``--qkv``, a cached adaptive layer
(``adaattn.AdaptiveAttention``, ``replan="per_bucket"``) on captured SmolLM2 q/k/v. Writes
``$ADAATTN_RESULTS/profile_host.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections.abc import Callable
from typing import Any

import torch

from tools.bench.common import graph_ms, host_us, median_ms, write_results


def _top(fn: Callable[[], Any], top: int, calls: int = 200) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _cases(qkv: str | None) -> dict[str, Callable[[], Any]]:
    import adaattn_kernels
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention

    heads, seq, d = 16, 8192, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    hyb = HybridPlan.uniform(1, heads, seq_len_k=seq, window=512, rank=128, sinks=4, device="cuda")
    mixed = HybridPlan.build(
        1, heads, seq_len_k=seq, window=512, rank=128, sinks=4,
        exact=(torch.arange(heads) % 2 == 0)[None, :], device="cuda",
    )  # fmt: skip
    cases: dict[str, Callable[[], Any]] = {
        "dense 16x8192x64": lambda: adaattn_kernels.attention(q, k, v, causal=True),
        "hybrid all 16x8192x64": lambda: hybrid_attention(q, k, v, hyb, causal=True),
        "hybrid half 16x8192x64": lambda: hybrid_attention(q, k, v, mixed, causal=True),
    }
    if qkv:
        from adaattn import AdaAttnConfig, AdaptiveAttention

        data = torch.load(qkv, map_location="cuda", weights_only=False)
        cq, ck, cv = (data[n] for n in ("q", "k", "v"))  # float16, as captured
        config = AdaAttnConfig.adaptive(0.02, policy="balanced", replan="per_bucket", min_seq_len=0)
        layer = AdaptiveAttention(config, layer_idx=0)
        call = lambda: layer(cq, ck, cv, is_causal=True, enable_gqa=True)
        call()  # plans once; later calls reuse the plan
        plan = layer.plan
        name = f"adaptive cached {tuple(cq.shape)} {plan.mode_counts() if plan else ''}"
        cases[name] = call
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qkv", help="a q/k/v capture of tools/capture_qkv.py (.carry/qkv/*.pt)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_host needs a CUDA GPU")
    from adaattn_kernels._triton import set_replay

    rows = []
    with torch.no_grad():
        for name, fn in _cases(args.qkv).items():
            fn()
            row: dict[str, Any] = {"case": name}
            for replay in (False, True):
                set_replay(replay)
                fn()
                tag = "" if replay else "_no_replay"
                row[f"eager_ms{tag}"] = median_ms(fn)
                row[f"host_us_per_call{tag}"] = host_us(fn)
            row["gpu_graph_ms"] = graph_ms(fn)
            row["profile"] = _top(fn, args.top)
            print(
                f"=== {name}: eager {row['eager_ms']:.3f} ms (no replay "
                f"{row['eager_ms_no_replay']:.3f}), graph {row['gpu_graph_ms'] or float('nan'):.3f}"
                f" ms, host {row['host_us_per_call']:.0f} us (no replay "
                f"{row['host_us_per_call_no_replay']:.0f})"
            )
            print(row["profile"], flush=True)
            rows.append(row)
    write_results("profile_host", rows)


if __name__ == "__main__":
    main()
