"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under the Triton interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here).

    Looked up once at import: ``torch.compile`` cannot trace ``importlib.util.find_spec``.
    """
    return _TRITON_INSTALLED


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: on CUDA, or on CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def eager_inference(*tensors: torch.Tensor) -> bool:
    """Whether a kernel call may skip its custom op and launch directly.

    True outside ``torch.compile`` tracing when no input needs a gradient. The custom ops exist
    for autograd and for tracing; their dispatch costs ~25 us of host time per call, as much as
    the whole GPU work of a short launch, so eager inference goes around them.
    """
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
