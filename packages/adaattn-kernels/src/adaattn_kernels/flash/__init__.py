"""Dense exact attention: fused Triton FlashAttention-2 kernels and the plain-PyTorch reference.

Public entry points are re-exported from :mod:`adaattn_kernels`:
:func:`~adaattn_kernels.flash.api.attention` and
:func:`~adaattn_kernels.flash.naive.attention_reference`. The custom ops
``torch.ops.adaattn.flash_attention`` / ``flash_attention_backward`` are registered on first use
of the Triton backend (import :mod:`adaattn_kernels.flash.op` to register them eagerly).
"""

from adaattn_kernels.flash.api import (
    TRITON_HEAD_DIMS,
    attention,
    merge_attention_states_,
    triton_unsupported_reason,
)
from adaattn_kernels.flash.naive import (
    attention_backward_reference,
    attention_reference,
    merge_attention_states_reference,
)

__all__ = [
    "TRITON_HEAD_DIMS",
    "attention",
    "attention_backward_reference",
    "attention_reference",
    "merge_attention_states_",
    "merge_attention_states_reference",
    "triton_unsupported_reason",
]
