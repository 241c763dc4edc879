"""``python -m adaattn_precision``: print what this machine's devices support natively.

Prints one column per device (the CPU and every visible CUDA device) with the compute
capability, SM count, memory, native bf16 / fp16 / tf32 / fp8 support and Triton
availability. Uses ``rich`` when installed (extra ``cli``), else a plain-text table.
``--json`` prints machine-readable output instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .__about__ import __version__
from .capability import DeviceCapability, detect


def _devices(selected: str | None) -> list[DeviceCapability]:
    if selected is not None:
        return [detect(selected)]
    caps = [detect("cpu")]
    if torch.cuda.is_available():
        caps.extend(detect(i) for i in range(torch.cuda.device_count()))
    return caps


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def capability_rows(caps: Sequence[DeviceCapability]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one row per property, one column per device) of the table."""
    header = ["", *(c.device for c in caps)]
    rows = [
        ["name", *(c.name for c in caps)],
        ["vendor", *(c.vendor for c in caps)],
        [
            "compute capability",
            *(
                f"{c.compute_capability[0]}.{c.compute_capability[1]}" if c.is_cuda else "-"
                for c in caps
            ),
        ],
        ["SMs / cores", *(str(c.sm_count) for c in caps)],
        ["memory (GiB)", *(f"{c.total_memory / 2**30:.1f}" for c in caps)],
        ["bf16 native", *(_yes(c.bf16) for c in caps)],
        ["fp16 native", *(_yes(c.fp16) for c in caps)],
        ["tf32 native", *(_yes(c.tf32) for c in caps)],
        ["fp8 e4m3 native", *(_yes(c.fp8_e4m3) for c in caps)],
        ["fp8 e5m2 native", *(_yes(c.fp8_e5m2) for c in caps)],
        ["triton available", *(_yes(c.triton) for c in caps)],
    ]
    return header, rows


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a plain-text table with aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(lines)


def _print_rich(header: list[str], rows: list[list[str]], title: str) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    console = Console()
    console.print(title)
    table = Table()
    for i, col in enumerate(header):
        table.add_column(col, style="bold" if i == 0 else None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m adaattn_precision",
        description="Print the native precisions of this machine's devices.",
    )
    parser.add_argument("--device", default=None, help="only this device (e.g. cpu, cuda:0)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--plain", action="store_true", help="plain text even if rich is installed")
    args = parser.parse_args(argv)
    try:
        caps = _devices(args.device)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([c.to_dict() for c in caps], indent=2))
        return 0
    title = f"adaattn-precision {__version__} (torch {torch.__version__})"
    header, rows = capability_rows(caps)
    if args.plain or not _print_rich(header, rows, title):
        print(title)
        print(plain_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
