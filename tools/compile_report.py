"""Record what the sm_90 ahead-of-time compile tests measure: registers, spills, wgmma forms.

Usage: ``python -m tools.compile_report`` (any machine with an NVIDIA build of Triton: its wheel
bundles ``ptxas``; no GPU needed). Runs the compile scripts of
``packages/adaattn-kernels/tests/test_{flash,fp8,hybrid}_compile.py`` on their own cases and
writes ``results/compile_sm90.json``, the source of the register and spill figures in the docs.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from tools.bench.common import write_results

TESTS = Path(__file__).resolve().parents[1] / "packages" / "adaattn-kernels" / "tests"


def main() -> None:
    sys.path.insert(0, str(TESTS))
    import json

    from sm90_compile import run_compile

    rows: list[dict[str, Any]] = []
    for kernel in ("flash", "fp8", "hybrid"):
        mod = importlib.import_module(f"test_{kernel}_compile")
        cases = getattr(mod, "CASES", None)
        args = (json.dumps(cases),) if cases is not None else ()
        for r in run_compile(mod._SCRIPT, *args):
            r.pop("sass", None)
            rows.append({"test": f"test_{kernel}_compile", **r})
    write_results("compile_sm90", rows, target="sm_90 (ptxas bundled with Triton), 8 warps")


if __name__ == "__main__":
    main()
