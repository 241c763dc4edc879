"""Where the planner's time goes: tensor ops, host synchronisations and wall time per plan.

    python -m tools.bench.profile_planner                      # the captures in .carry/qkv
    python -m tools.bench.profile_planner --device cpu --seqs 2048 --reps 2

Planning is a chain of small tensor operations, so on a GPU its cost is set by how many kernels
it launches and how often the host waits for a result (``float(t)``, ``bool(t)``, ``t.tolist()``),
not by FLOPs. This driver runs :meth:`adaattn.planner.Planner.plan` on real SmolLM2 q/k/v
(``tools/capture_qkv.py``) under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that counts every aten operation, and among them the scalar reads that synchronise a GPU
(``aten::_local_scalar_dense`` behind ``float``/``int``/``bool``/``.item()``, ``aten::is_nonzero``
and copies of a device tensor to the host). The counts are the same on any device, so a CPU run
already shows what a change saves; the wall time is the device's own (medians over ``--reps``
plans, CUDA-synchronised on a GPU). Writes ``results/profile_planner.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tools.bench.bench_adaptive import _captures
from tools.bench.common import REPO, write_results

# Operations that return a value to Python: on a GPU each one waits for the queue to drain.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose"}


class _OpCounter(TorchDispatchMode):
    """Counts aten operations, and the host synchronisations among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name()
        name = name if name.startswith("aten::") else f"aten::{name}"
        name = name.split(".")[0]
        self.ops[name] += 1
        kwargs = kwargs or {}
        copy = name in ("aten::_to_copy", "aten::copy_")
        if name in _SYNC_OPS or (copy and _to_host(args, kwargs)):
            self.syncs += 1
        return func(*args, **kwargs)


def _to_host(args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a copy moves a device tensor to the host (a synchronising transfer)."""
    src = args[0] if args else None
    if not isinstance(src, torch.Tensor) or src.device.type == "cpu":
        return False
    dst = kwargs.get("device")
    if dst is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        dst = args[1].device
    return dst is not None and torch.device(dst).type == "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--qkv", type=Path, nargs="+", default=[REPO / ".carry" / "qkv"])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192])
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--policy", default="balanced")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="most frequent ops to record")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from adaattn import AdaAttnConfig
    from adaattn._sdpa import prepare
    from adaattn.planner import Planner

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = AdaAttnConfig.adaptive(args.tolerance, policy=args.policy, min_seq_len=0)
    rows = []
    for name, cap in _captures(args.qkv):
        for seq in args.seqs:
            if seq > cap["q"].shape[2]:
                continue
            q, k, v = (cap[x][:, :, :seq].to(device, dtype) for x in ("q", "k", "v"))
            problem = prepare(q, k, v, None, True, None, True)
            planner = Planner(config, layer_idx=0)
            plan = planner.plan(problem)  # warm-up (kernel compilation, autotuning)
            counter = _OpCounter()
            with counter:
                planner.plan(problem)
            times = []
            for _ in range(args.reps):
                _sync(device)
                t0 = time.perf_counter()
                planner.plan(problem)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            row = {
                "capture": name,
                "seq": seq,
                "shape": list(q.shape),
                "modes": plan.mode_counts(),
                "plan_ms": statistics.median(times),
                "aten_ops": sum(counter.ops.values()),
                "host_syncs": counter.syncs,
                "top_ops": dict(counter.ops.most_common(args.top)),
            }
            print(
                f"{name} seq {seq}: {row['plan_ms']:.1f} ms, {row['aten_ops']} aten ops, "
                f"{row['host_syncs']} host syncs, modes {row['modes']}"
            )
            rows.append(row)
    write_results(
        "profile_planner",
        rows,
        settings={"tolerance": args.tolerance, "policy": args.policy, "reps": args.reps},
    )


if __name__ == "__main__":
    main()
