"""adaattn-kernels: Triton attention kernels with plain-PyTorch references.

Dense exact attention (:func:`attention`, fused FlashAttention-2 forward and backward in Triton)
and its reference (:func:`attention_reference`). The FP8 and hybrid low-rank kernels live in the
``adaattn_kernels.fp8`` and ``adaattn_kernels.hybrid`` subpackages.
"""

from adaattn_kernels.__about__ import __version__
from adaattn_kernels.flash import TRITON_HEAD_DIMS, attention, attention_reference

__all__ = [
    "TRITON_HEAD_DIMS",
    "__version__",
    "attention",
    "attention_reference",
    # --- fp8 / hybrid exports are wired here by the lead (adaattn_kernels.fp8, .hybrid) ---
]
