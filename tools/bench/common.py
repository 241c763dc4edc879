"""Helpers shared by the benchmark drivers: environment record, timing, JSON output.

Every driver writes one JSON file under ``results/`` holding the environment (device, versions,
date), the command that produced it and one row per measured case, so that docs and plots read
recorded numbers only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
# On the GPU machine, point ADAATTN_RESULTS at $OUT so the files come back.
RESULTS = Path(os.environ.get("ADAATTN_RESULTS", REPO / "results"))


def environment() -> dict[str, Any]:
    """Describe the machine and software versions a measurement ran on."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = "cpu"
    return env


def median_ms(fn: Callable[[], Any], *, warmup: int = 25, rep: int = 100) -> float:
    """Median run time of ``fn`` in milliseconds (CUDA events via triton's do_bench on GPU)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import statistics
    import time

    fn()
    times = []
    for _ in range(max(3, rep // 20)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(fn: Callable[[], Any], calls: int = 50) -> float:
    """Host time per call of ``fn`` in microseconds: ``calls`` calls enqueued back to back.

    No synchronisation between calls, so a call whose host time exceeds its GPU time is
    launch-bound: this figure, not the GPU's, then sets its eager speed.
    """
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_ms(fn: Callable[[], Any], *, rep: int = 40) -> float | None:
    """Median GPU time of ``fn`` replayed from a CUDA graph, in milliseconds.

    The graph replays the recorded kernels without running Python, so this is the time the GPU
    spends, with no host launch cost: the figure for comparing kernels, beside the eager
    :func:`median_ms` that a Python caller sees. ``None`` where ``fn`` cannot be captured.
    """
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception:  # capture needs graph-safe code; report no number rather than a wrong one
        return None


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``‖out − ref‖ / ‖ref‖`` computed in float64."""
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def write_results(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Write ``results/<name>.json`` with the environment record and ``rows``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"name": name, "environment": environment(), **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} ({len(rows)} rows)")
    return path
