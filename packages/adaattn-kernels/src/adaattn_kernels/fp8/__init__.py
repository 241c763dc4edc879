"""FP8 (e4m3) attention forward: fused Triton quantisation + attention, and its float8 reference.

Public entry points:

* :func:`fp8_attention` — the op (Triton on FP8-capable CUDA devices; simulation on CPU);
* :func:`fp8_attention_reference` — the same quantisation simulated with ``torch.float8_e4m3fn``
  (accepts ``rows=`` to evaluate sampled query rows);
* :func:`fp8_attention_error` — per-head measured relative error on sampled rows, for the
  planner;
* :func:`quantize_fp8_triton` — the fused quantisation kernel, bit-exact with
  :func:`adaattn_precision.quantize_fp8`.

The custom op ``torch.ops.adaattn.fp8_attention`` is registered on first use of the Triton
backend (import :mod:`adaattn_kernels.fp8.op` to register it eagerly).
"""

from adaattn_kernels.fp8.api import FP8_HEAD_DIMS, fp8_attention, fp8_unsupported_reason
from adaattn_kernels.fp8.naive import PV_DTYPES, fp8_attention_error, fp8_attention_reference
from adaattn_kernels.fp8.quant import TRITON_GRANULARITIES, kernel_tile_n, quantize_fp8_triton

__all__ = [
    "FP8_HEAD_DIMS",
    "PV_DTYPES",
    "TRITON_GRANULARITIES",
    "fp8_attention",
    "fp8_attention_error",
    "fp8_attention_reference",
    "fp8_unsupported_reason",
    "kernel_tile_n",
    "quantize_fp8_triton",
]
