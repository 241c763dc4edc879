"""Predicted vs measured attention-output error over a grid of synthetic heads.

Run from the repository root::

    PYTHONPATH=packages/adaattn-precision/src python \
        packages/adaattn-precision/benchmarks/calibrate_error_model.py --out ratios.json

For every configuration (sequence length, head dim, Q scale, Q outlier channels, K
offset, V mean, distribution) and every requested precision / FP8 granularity it prints
the distribution of ``predicted / measured`` (measured = float64 attention on rounded,
K-smoothed inputs vs exact float64 attention). ``CALIBRATION`` in ``select.py`` is chosen
so that the minimum ratio over this grid is >= 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch
from adaattn_precision import FP8Config, predict_attention_error, tensor_stats
from adaattn_precision.calibrate import measure_attention_error, synthetic_qkv

GRID = {
    "seq_len": [64, 512],
    "head_dim": [64, 128],
    "q_scale": [0.5, 1.0, 2.0, 4.0],
    "q_outliers": [0, 3],
    "k_offset": [0.0, 10.0],
    "v_mean": [0.0, 2.0],
    "dist": ["normal", "student_t"],
}


def main() -> None:
    """Run the grid and print the ratio distribution per case."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["fp8_e4m3:block", "fp8_e4m3:token", "fp8_e4m3:tensor", "fp8_e5m2:block", "bf16:-"],
        help="precision:granularity pairs",
    )
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--causal", action="store_true", help="causal mask")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # many small tensors: threads only add overhead
    results: dict[str, list[dict[str, object]]] = {}
    for case in args.cases:
        precision, gran = case.split(":")
        fmt = precision[4:] if precision.startswith("fp8") else "e4m3"
        cfg = FP8Config(fmt=fmt, granularity=gran if gran != "-" else "block")
        rows = []
        t0 = time.time()
        for seed, values in enumerate(itertools.product(*GRID.values())):
            params = dict(zip(GRID, values))
            q, k, v = synthetic_qkv(heads=args.heads, seed=seed, **params)  # type: ignore[arg-type]
            scale = 1 / math.sqrt(params["head_dim"])  # type: ignore[arg-type]
            pred = predict_attention_error(
                tensor_stats(q),
                tensor_stats(k),
                tensor_stats(v),
                precision=precision,
                scale=scale,
                fp8=cfg,
                causal=args.causal,
            )
            meas = measure_attention_error(
                q, k, v, precision=precision, scale=scale, fp8=cfg, causal=args.causal
            )
            for p, m in zip(pred.flatten().tolist(), meas.flatten().tolist()):
                rows.append({**params, "predicted": p, "measured": m, "ratio": p / m})
        ratios = sorted(r["ratio"] for r in rows)  # type: ignore[misc]
        n = len(ratios)
        print(
            f"{case:18s} n={n} min={ratios[0]:.2f} p5={ratios[n // 20]:.2f} "
            f"median={statistics.median(ratios):.2f} p95={ratios[-(n // 20) - 1]:.2f} "
            f"max={ratios[-1]:.2f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        results[case] = rows
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
