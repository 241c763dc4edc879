"""Shared machinery of the ahead-of-time sm_90 compile tests (``test_*_compile.py``).

Triton's wheel bundles ``ptxas`` and ``cuobjdump``, so Triton → TTGIR → LLVM → PTX → SASS runs on
a CPU-only machine. Each test sends a script body to :func:`run_compile`, which runs it in a
subprocess without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions,
which then cannot be compiled) after :data:`PRELUDE`, whose ``build`` compiles one kernel
configuration and reports its registers, spills (stack bytes), ``wgmma`` forms and, on request,
counts of SASS instructions. The body prints one JSON list as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
#: Skip marker of the compile tests: the toolchain ships only with NVIDIA builds of Triton.
requires_sm90_toolchain = pytest.mark.skipif(
    not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
    reason="this Triton installation has no bundled ptxas/cuobjdump (non-NVIDIA build)",
)

PRELUDE = r"""
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = sys.argv[1]
ARGS = sys.argv[2:]


def build(fn, types, constexprs, warps, stages, sass_ops=()):
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ptx = k.asm["ptx"]
    out = {"regs": int(m.group(1)), "stack": int(m.group(2)),
           "wgmma": sorted({ln.split()[0] for ln in ptx.splitlines() if "wgmma.mma_async" in ln})}
    if sass_ops:
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
        out["sass"] = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass))
                       for op in sass_ops}
    return out

"""


def run_compile(body: str, *args: str) -> list[dict[str, Any]]:
    """Run ``PRELUDE + body`` (``ARGS`` = ``args``) and return the JSON list it printed last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + body, str(BIN / "cuobjdump"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:  # shown with `pytest -s`
        print(r)
    return results
