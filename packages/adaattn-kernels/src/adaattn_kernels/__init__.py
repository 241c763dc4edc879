"""adaattn-kernels: Triton attention kernels with plain-PyTorch references.

- Dense exact attention: :func:`attention` (fused FlashAttention-2 forward and backward in
  Triton) and its reference :func:`attention_reference`; :func:`merge_attention_states_` folds
  two partial results over disjoint key sets into one (ring attention, split keys).
- Low-precision attention forward: :func:`fp8_attention` (subpackage ``adaattn_kernels.fp8``).
- Hybrid attention — exact sinks + local window + pooled low-rank far field, a plan per head:
  :func:`hybrid_attention` with a :class:`HybridPlan` (subpackage ``adaattn_kernels.hybrid``).

Every kernel sits next to a plain-PyTorch reference that CPU users run and tests compare to.
"""

from adaattn_kernels.__about__ import __version__
from adaattn_kernels.flash import (
    TRITON_HEAD_DIMS,
    attention,
    attention_reference,
    merge_attention_states_,
)
from adaattn_kernels.fp8 import (
    FP8_HEAD_DIMS,
    fp8_attention,
    fp8_attention_error,
    fp8_attention_reference,
    quantize_fp8_triton,
)
from adaattn_kernels.hybrid import (
    HybridPlan,
    estimate_hybrid_error,
    hybrid_attention,
    hybrid_attention_reference,
    predict_hybrid_error,
)

__all__ = [
    "FP8_HEAD_DIMS",
    "TRITON_HEAD_DIMS",
    "HybridPlan",
    "__version__",
    "attention",
    "attention_reference",
    "estimate_hybrid_error",
    "fp8_attention",
    "fp8_attention_error",
    "fp8_attention_reference",
    "hybrid_attention",
    "hybrid_attention_reference",
    "merge_attention_states_",
    "predict_hybrid_error",
    "quantize_fp8_triton",
]
