"""Adaptive-rank (hybrid) attention: exact heads and sinks + window + pooled far-field heads.

Public API:

* :class:`HybridPlan` — per-(batch, head) plan tensors read by the kernel.
* :func:`hybrid_attention` — the fused Triton forward (one launch for mixed plans) and its
  PyTorch reference :func:`hybrid_attention_reference`.
* :func:`build_far_field` — the fused pooling kernel (segment means of K and V).
* :func:`estimate_hybrid_error` — per-head error of a plan measured on sampled query rows.
* :func:`predict_hybrid_error` — cheap per-head predictor from entropy and within-segment score
  variance, for scanning many ``(w, r)`` candidates.
* :func:`hybrid_key_coverage` — check that a plan's decomposition covers each key once.
"""

from adaattn_kernels.hybrid.api import HYBRID_TRITON_HEAD_DIMS, build_far_field, hybrid_attention
from adaattn_kernels.hybrid.estimate import (
    HybridErrorPrediction,
    estimate_hybrid_error,
    exact_attention_rows,
    predict_hybrid_error,
    sample_query_rows,
)
from adaattn_kernels.hybrid.naive import (
    hybrid_attention_reference,
    hybrid_key_coverage,
    pooled_far_field_reference,
)
from adaattn_kernels.hybrid.plan import HybridPlan, segment_size_for_rank

__all__ = [
    "HYBRID_TRITON_HEAD_DIMS",
    "HybridErrorPrediction",
    "HybridPlan",
    "build_far_field",
    "estimate_hybrid_error",
    "exact_attention_rows",
    "hybrid_attention",
    "hybrid_attention_reference",
    "hybrid_key_coverage",
    "pooled_far_field_reference",
    "predict_hybrid_error",
    "sample_query_rows",
    "segment_size_for_rank",
]
