"""8-bit attention forward (int8 or e4m3 Q·Kᵀ, e4m3 or 16-bit P·V): Triton kernels + reference.

Public entry points:

* :func:`fp8_attention` — the op (Triton on FP8-capable CUDA devices; simulation on CPU);
* :func:`fp8_attention_reference` — the same quantisation simulated with ``torch.float8_e4m3fn``
  (accepts ``rows=`` to evaluate sampled query rows);
* :func:`fp8_attention_error` — per-head measured relative error on sampled rows, for the
  planner;
* :func:`quantize_fp8_triton` — the fused quantisation kernel, bit-exact with
  :func:`adaattn_precision.quantize_fp8`;
* :func:`quantize_int8` / :func:`quantize_int8_triton` — the symmetric int8 quantisation of Q
  and K for ``qk_dtype="int8"`` (the default), in PyTorch and in Triton (bit-exact).

The custom op ``torch.ops.adaattn.fp8_attention`` is registered on first use of the Triton
backend (import :mod:`adaattn_kernels.fp8.op` to register it eagerly).
"""

from adaattn_kernels.fp8.api import FP8_HEAD_DIMS, fp8_attention, fp8_unsupported_reason
from adaattn_kernels.fp8.naive import (
    ATTENTION_GRANULARITIES,
    MAX_BLOCK_SIZE,
    PV_DTYPES,
    QK_DTYPES,
    fp8_attention_error,
    fp8_attention_reference,
    quantize_int8,
)
from adaattn_kernels.fp8.quant import (
    TRITON_GRANULARITIES,
    kernel_tile_n,
    quantize_fp8_triton,
    quantize_int8_triton,
)

__all__ = [
    "ATTENTION_GRANULARITIES",
    "FP8_HEAD_DIMS",
    "MAX_BLOCK_SIZE",
    "PV_DTYPES",
    "QK_DTYPES",
    "TRITON_GRANULARITIES",
    "fp8_attention",
    "fp8_attention_error",
    "fp8_attention_reference",
    "fp8_unsupported_reason",
    "kernel_tile_n",
    "quantize_fp8_triton",
    "quantize_int8",
    "quantize_int8_triton",
]
