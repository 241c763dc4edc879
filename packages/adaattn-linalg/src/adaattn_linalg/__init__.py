"""adaattn-linalg: numerics for analysing attention.

Streaming and sampled attention entropy, stochastic trace estimation (Hutchinson, Hutch++,
XTrace), batched randomized SVD, spectral norm and effective ranks, and an implicit attention
operator that lets all of them run on ``softmax(q kᵀ)`` at long sequence lengths without
materialising it. Depends on torch and numpy only.
"""

from adaattn_linalg.__about__ import __version__
from adaattn_linalg.entropy import (
    MultiScaleEntropy,
    SampledEntropy,
    entropy,
    entropy_from_logits,
    multiscale_entropy,
    sampled_entropy,
    streaming_entropy,
)
from adaattn_linalg.operators import AttentionOperator, DenseOperator, LinearOperator, as_operator
from adaattn_linalg.spectral import effective_rank, numerical_rank, spectral_norm, stable_rank
from adaattn_linalg.svd import SVDResult, randomized_svd
from adaattn_linalg.trace import (
    XTraceResult,
    diagonal_estimate,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)

__all__ = [
    "AttentionOperator",
    "DenseOperator",
    "LinearOperator",
    "MultiScaleEntropy",
    "SVDResult",
    "SampledEntropy",
    "XTraceResult",
    "__version__",
    "as_operator",
    "diagonal_estimate",
    "effective_rank",
    "entropy",
    "entropy_from_logits",
    "hutchinson_trace",
    "hutchpp_trace",
    "multiscale_entropy",
    "numerical_rank",
    "randomized_svd",
    "sampled_entropy",
    "spectral_norm",
    "stable_rank",
    "streaming_entropy",
    "xtrace",
]
