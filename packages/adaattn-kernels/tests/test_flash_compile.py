"""Compile the dense forward kernel for sm_90 ahead of time — no GPU needed.

As in ``test_fp8_compile.py``: Triton's wheel bundles ``ptxas`` and ``cuobjdump``, so this runs
on the CPU-only CI machine and catches what the interpreter cannot — code the GPU compiler
rejects and register spills — for the default exponentials and the polynomial-``exp2`` modes
(``ADAATTN_FLASH_EXP2``), whose column split must stay register-local. It also checks, in the
SASS, that those modes move exponentials off the MUFU unit (fewer ``MUFU.EX2``, more FMA-pipe
instructions): the point of the option.
"""

from __future__ import annotations

import json

from sm90_compile import requires_sm90_toolchain, run_compile

pytestmark = requires_sm90_toolchain

_SCRIPT = r"""
from adaattn_kernels.flash import _triton_kernels as K

fn = K._fwd_kernel.fn
types = dict(Q="*bf16", K="*bf16", V="*bf16", Mask="*i8", Out="*bf16", Lse="*fp32",
             HeadIdx="*i32", desc_k="*bf16", desc_v="*bf16", qk_scale="fp32")
out = []
for d, bm, bn, mode in json.loads(ARGS[0]):
    ce = dict(HEAD_DIM=d, BLOCK_D=d, CAUSAL=False, MASK_KIND=0, USE_TMA=False, EXP2_MODE=mode,
              HEAD_LIST=False, BLOCK_M=bm, BLOCK_N=bn)
    r = build(fn, types, ce, 8, 3, sass_ops=("MUFU.EX2", "FFMA", "FADD"))
    sass = r.pop("sass")
    out.append({"case": [d, bm, bn, mode], **r, "ex2": sass["MUFU.EX2"],
                "fma_pipe": sass["FFMA"] + sass["FADD"]})
print(json.dumps(out))
"""

# head_dim, BLOCK_M, BLOCK_N, EXP2_MODE (0 MUFU, 1 half polynomial, 2 all polynomial): the
# autotuned configs at head_dim 128 and 64.
CASES = [
    [128, 128, 128, 0],
    [128, 128, 128, 1],
    [128, 128, 128, 2],
    [64, 128, 64, 0],
    [64, 128, 64, 1],
]


def test_forward_compiles_for_sm90_and_exp2_modes_leave_mufu() -> None:
    results = {tuple(r["case"]): r for r in run_compile(_SCRIPT, json.dumps(CASES))}
    for r in results.values():
        assert r["regs"] <= 255, r
        assert r["stack"] <= 16, f"register spills: {r}"
    for d, bm, bn in {(c[0], c[1], c[2]) for c in CASES}:
        base = results[(d, bm, bn, 0)]
        for mode in (1, 2):
            if (d, bm, bn, mode) not in results:
                continue
            r = results[(d, bm, bn, mode)]
            # Per thread and unmasked tile, BLOCK_M·BLOCK_N/256 exponentials leave the MUFU
            # unit in mode 2 (half of them in mode 1); each costs ~6 FMA-pipe instructions.
            moved = bm * bn // (32 * 8) // (2 if mode == 1 else 1)
            assert base["ex2"] - r["ex2"] == moved, (base, r)
            assert r["fma_pipe"] - base["fma_pipe"] >= 5 * moved, (base, r)
