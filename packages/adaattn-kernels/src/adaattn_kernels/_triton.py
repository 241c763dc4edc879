"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under the Triton interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: on CUDA, or on CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
