"""Where the planner's time goes: tensor ops, host synchronisations and wall time per plan.

    python -m tools.bench.profile_planner                      # the captures in .carry/qkv
    python -m tools.bench.profile_planner --device cpu --seqs 2048 --reps 2

Planning is a chain of small tensor operations, so on a GPU its cost is set by how many kernels
it launches and how often the host waits for a result (``float(t)``, ``bool(t)``, ``t.tolist()``),
not by FLOPs. This driver runs :meth:`adaattn.planner.Planner.plan` on real SmolLM2 q/k/v
(``tools/capture_qkv.py``) under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that counts every aten operation, and among them the host synchronisations: scalar reads
(``aten::_local_scalar_dense`` behind ``float``/``int``/``bool``/``.item()``, ``aten::equal``)
and blocking copies of a device tensor to the host (``.cpu()``, ``.tolist()`` on a GPU). On a
CPU run no tensor lives on a device, so copies are invisible to the dispatcher; there every
``Tensor.tolist()`` call is counted instead (each is one transfer when the planner runs on a
GPU, as all of its ``.tolist()`` calls read device results). The operation counts are the same
on any device up to the paths that differ by device (the FP8 error is simulated on CPU and
measured with the Triton kernel on a GPU); the wall time is the device's own (medians over
``--reps`` plans, CUDA-synchronised on a GPU). Writes ``results/profile_planner.json``.
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
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::equal", "aten::allclose"}


class _OpCounter(TorchDispatchMode):
    """Counts aten operations, and the host synchronisations among them."""

    def __init__(self, *, count_tolist: bool) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0
        self._count_tolist = count_tolist
        self._tolist = torch.Tensor.tolist

    def __enter__(self) -> _OpCounter:
        if self._count_tolist:
            tolist = self._tolist

            def counted(t: torch.Tensor) -> Any:
                self.syncs += 1
                return tolist(t)

            torch.Tensor.tolist = counted  # type: ignore[method-assign]  # restored on exit
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name()
        name = name if name.startswith("aten::") else f"aten::{name}"
        name = name.split(".")[0]
        self.ops[name] += 1
        kwargs = kwargs or {}
        if name in _SYNC_OPS or _blocking_copy_to_host(name, args, kwargs):
            self.syncs += 1
        return func(*args, **kwargs)


def _blocking_copy_to_host(name: str, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether an op copies a device tensor to the host and waits for it."""
    if kwargs.get("non_blocking") or (name == "aten::copy_" and len(args) > 2 and args[2]):
        return False
    if name == "aten::_to_copy":  # _to_copy(src, *, device=...)
        src, dst = args[0], kwargs.get("device")
        dst_type = None if dst is None else torch.device(dst).type
    elif name == "aten::copy_":  # copy_(dst, src, non_blocking)
        src, dst_type = args[1], args[0].device.type
    else:
        return False
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_type == "cpu"


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
            counter = _OpCounter(count_tolist=device.type == "cpu")
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
