"""Exceptions and warnings raised by :mod:`adaattn`.

The SDPA-compatible entry points raise where
:func:`torch.nn.functional.scaled_dot_product_attention` raises. PyTorch raises
``RuntimeError`` for bad SDPA arguments; the project convention is ``ValueError`` /
``TypeError``. The classes below derive from both, so ``except RuntimeError`` written
against PyTorch keeps working and ``except ValueError`` works too.
"""

from __future__ import annotations

__all__ = ["AdaAttnFallbackWarning", "SDPAArgumentError", "SDPATypeError"]


class SDPAArgumentError(ValueError, RuntimeError):
    """An SDPA argument has a bad value or shape (PyTorch raises ``RuntimeError`` here)."""


class SDPATypeError(TypeError, RuntimeError):
    """An SDPA argument has a bad type or dtype (PyTorch raises ``RuntimeError`` here)."""


class AdaAttnFallbackWarning(UserWarning):
    """A call could not run on AdaAttn's kernels and ran on ``torch`` SDPA instead.

    Emitted once per distinct reason (Python's default warning filter); every fallback is
    also counted in :func:`adaattn.dispatch_stats`.
    """
