"""Shared argument validation: every public function checks its inputs through these helpers.

Errors name the offending argument and say how to fix it, so a user never gets a silent wrong
answer or a shape error from deep inside a matmul.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the numerics run in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(
    x: Any,
    name: str,
    *,
    min_ndim: int = 0,
    ndim: int | None = None,
    finite: bool = True,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite, floating-point tensor with enough dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}; convert it with `{name}.float()`"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"`{name}` must have exactly {ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); pass a non-empty tensor")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or Inf values; clean the input first")
    return x


def check_no_nan(x: torch.Tensor, name: str) -> None:
    """Reject NaN and +Inf (``-inf`` is allowed: it marks masked logits)."""
    if bool(torch.isnan(x).any()) or bool(torch.isposinf(x).any()):
        raise ValueError(f"`{name}` contains NaN or +Inf values; only -inf (masked) is allowed")


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Check that ``value`` is an integer (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def check_float(
    value: Any,
    name: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    open_unit: bool = False,
) -> float:
    """Check that ``value`` is a finite real number with the requested sign/range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    if open_unit and not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must lie strictly between 0 and 1, got {value}")
    return value


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the allowed strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """Resolve the ``seed``/``generator`` pair into one generator (``None``: global RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either `seed` or `generator`, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}"
            )
        return generator
    if seed is None:
        return None
    seed = check_int(seed, "seed", minimum=0)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def randn(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Standard normal samples on ``device``, drawn on the generator's device."""
    out = torch.randn(
        shape, dtype=dtype, device=_draw_device(generator, device), generator=generator
    )
    return out.to(device)


def rademacher(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Random ±1 samples on ``device``, drawn on the generator's device."""
    bits = torch.randint(
        0, 2, shape, device=_draw_device(generator, device), generator=generator, dtype=torch.int8
    )
    return (bits.to(dtype) * 2 - 1).to(device)


def probes(
    shape: tuple[int, ...],
    distribution: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Probe vectors (columns of the last two dims) with ``E[z zᵀ] = I``.

    ``rademacher``: ±1 entries; ``gaussian``: N(0, 1) entries; ``sphere``: uniform on the sphere of
    radius √n (n = ``shape[-2]``).
    """
    if distribution == "rademacher":
        return rademacher(shape, dtype=dtype, device=device, generator=generator)
    z = randn(shape, dtype=dtype, device=device, generator=generator)
    if distribution == "sphere":
        n = shape[-2]
        z = z * (n**0.5 / torch.linalg.vector_norm(z, dim=-2, keepdim=True).clamp_min(1e-30))
    return z
