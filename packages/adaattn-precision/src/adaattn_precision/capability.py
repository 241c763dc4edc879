"""Device capability detection: which precisions a device runs natively.

The planner needs to know, per device, whether a precision is executed by the hardware
(tensor cores) or emulated. ``torch.cuda.is_bf16_supported()`` is not enough: with its
default arguments it reports ``True`` on pre-Ampere cards, where bf16 is emulated through
fp32. This module therefore derives support from the compute capability alone:

=============  =====================  ==================================================
precision      native from (sm)       hardware
=============  =====================  ==================================================
fp16           7.0                    Volta tensor cores (``mma.sync`` f16)
bf16           8.0                    Ampere tensor cores
tf32           8.0                    Ampere tensor cores
fp8 e4m3/e5m2  8.9                    Ada Lovelace (sm_89), Hopper (sm_90), Blackwell
=============  =====================  ==================================================

The design separates reading the device from interpreting it: :func:`detect` copies
``torch.cuda.get_device_properties`` into a small :class:`DeviceProperties` record and
:func:`capability_from_properties` is a pure function of that record, so every rule is
testable on a CPU-only machine with the properties of real cards.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

__all__ = [
    "BF16_MIN_CAPABILITY",
    "FP8_MIN_CAPABILITY",
    "FP16_MIN_CAPABILITY",
    "TF32_MIN_CAPABILITY",
    "DeviceCapability",
    "DeviceProperties",
    "capability_from_properties",
    "detect",
    "triton_available",
]

#: First compute capability with fp16 tensor cores (Volta).
FP16_MIN_CAPABILITY: tuple[int, int] = (7, 0)
#: First compute capability with native bf16 tensor cores (Ampere).
BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)
#: First compute capability with TF32 tensor cores (Ampere).
TF32_MIN_CAPABILITY: tuple[int, int] = (8, 0)
#: First compute capability with FP8 (e4m3 and e5m2) tensor cores (Ada Lovelace, sm_89).
FP8_MIN_CAPABILITY: tuple[int, int] = (8, 9)

Vendor = Literal["nvidia", "amd", "cpu"]


@dataclass(frozen=True)
class DeviceProperties:
    """The few device properties the capability rules need.

    This mirrors the fields of ``torch.cuda.get_device_properties`` that matter, so tests
    can describe real cards (an H100 is ``DeviceProperties("NVIDIA H100 80GB HBM3", 9, 0,
    132, 85_520_809_984)``) without a GPU.

    Attributes:
        name: Marketing name of the device, e.g. ``"NVIDIA H100 80GB HBM3"``.
        major: Compute capability major version (9 for Hopper).
        minor: Compute capability minor version.
        multi_processor_count: Number of streaming multiprocessors (SMs).
        total_memory: Device memory in bytes.
    """

    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        for field in ("major", "minor", "multi_processor_count", "total_memory"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{field} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{field} must be >= 0, got {value}")

    @classmethod
    def from_torch(cls, props: Any) -> DeviceProperties:
        """Copy the needed fields from a ``torch.cuda.get_device_properties`` result.

        Args:
            props: The object returned by ``torch.cuda.get_device_properties(index)``.

        Returns:
            The corresponding record.
        """
        return cls(
            name=str(props.name),
            major=int(props.major),
            minor=int(props.minor),
            multi_processor_count=int(props.multi_processor_count),
            total_memory=int(props.total_memory),
        )


@dataclass(frozen=True)
class DeviceCapability:
    """What a device supports natively (without emulation).

    Attributes:
        device: The device string, e.g. ``"cuda:0"`` or ``"cpu"``.
        vendor: ``"nvidia"``, ``"amd"`` (ROCm) or ``"cpu"``.
        name: Device name; never empty.
        compute_capability: ``(major, minor)``; ``(0, 0)`` on CPU.
        sm_count: Number of streaming multiprocessors; on CPU, the number of logical cores.
        total_memory: Device memory in bytes (host memory on CPU, 0 if unknown).
        bf16: Native bf16 matrix multiply (sm >= 8.0).
        fp16: Native fp16 matrix multiply (sm >= 7.0).
        tf32: TF32 tensor cores (sm >= 8.0).
        fp8_e4m3: FP8 e4m3 tensor cores (sm >= 8.9).
        fp8_e5m2: FP8 e5m2 tensor cores (sm >= 8.9).
        triton: Whether the ``triton`` package is importable (found, not imported).
    """

    device: str
    vendor: Vendor
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    total_memory: int
    bf16: bool
    fp16: bool
    tf32: bool
    fp8_e4m3: bool
    fp8_e5m2: bool
    triton: bool

    @property
    def fp8(self) -> bool:
        """Whether both FP8 formats (e4m3 and e5m2) run natively."""
        return self.fp8_e4m3 and self.fp8_e5m2

    @property
    def is_cuda(self) -> bool:
        """Whether this is a GPU (CUDA or ROCm) device."""
        return self.vendor != "cpu"

    def supports(self, dtype: str) -> bool:
        """Whether a precision, by its policy name, runs natively on this device.

        Args:
            dtype: One of ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"bf16"``, ``"fp16"``, ``"fp32"``.

        Returns:
            ``True`` if native; ``"fp32"`` is always supported.

        Raises:
            ValueError: If ``dtype`` is not a known precision name.
        """
        table = {
            "fp8_e4m3": self.fp8_e4m3,
            "fp8_e5m2": self.fp8_e5m2,
            "bf16": self.bf16,
            "fp16": self.fp16,
            "fp32": True,
        }
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        out = asdict(self)
        out["compute_capability"] = list(self.compute_capability)
        return out


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported, without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or partially initialised installation
        return False


def _at_least(cc: tuple[int, int], minimum: tuple[int, int]) -> bool:
    return cc >= minimum


def capability_from_properties(
    props: DeviceProperties,
    *,
    device: str = "cuda:0",
    vendor: Vendor = "nvidia",
    triton: bool | None = None,
) -> DeviceCapability:
    """Derive the native-precision capability of a GPU from its properties (pure function).

    Support is decided from the compute capability only (see the module table); no runtime
    probe is made, so emulated paths are never reported as native. For ``vendor="amd"``
    the fp16/bf16 rules follow the CDNA generations (``major >= 9``: MI200/MI300); FP8 is
    reported as unsupported because ROCm's FP8 formats before CDNA4 are the ``fnuz``
    variants, which differ from the OCP ``float8_e4m3fn`` / ``float8_e5m2`` used here.

    Args:
        props: Device properties (name, compute capability, SM count, memory).
        device: Device string recorded in the result.
        vendor: ``"nvidia"`` or ``"amd"``.
        triton: Triton availability; ``None`` detects it with :func:`triton_available`.

    Returns:
        The device capability.

    Raises:
        TypeError: If ``props`` is not a :class:`DeviceProperties`.
        ValueError: If ``vendor`` is not ``"nvidia"`` or ``"amd"``.
    """
    if not isinstance(props, DeviceProperties):
        raise TypeError(
            f"props must be a DeviceProperties, got {type(props).__name__}; "
            "use DeviceProperties.from_torch(torch.cuda.get_device_properties(i))"
        )
    if vendor not in ("nvidia", "amd"):
        raise ValueError(f"vendor must be 'nvidia' or 'amd' for a GPU, got {vendor!r}")
    cc = (props.major, props.minor)
    if vendor == "nvidia":
        fp16 = _at_least(cc, FP16_MIN_CAPABILITY)
        bf16 = _at_least(cc, BF16_MIN_CAPABILITY)
        tf32 = _at_least(cc, TF32_MIN_CAPABILITY)
        fp8 = _at_least(cc, FP8_MIN_CAPABILITY)
    else:
        fp16 = props.major >= 9
        bf16 = props.major >= 9
        tf32 = False
        fp8 = False
    return DeviceCapability(
        device=device,
        vendor=vendor,
        name=props.name or f"{vendor} GPU sm_{props.major}{props.minor}",
        compute_capability=cc,
        sm_count=props.multi_processor_count,
        total_memory=props.total_memory,
        bf16=bf16,
        fp16=fp16,
        tf32=tf32,
        fp8_e4m3=fp8,
        fp8_e5m2=fp8,
        triton=triton_available() if triton is None else bool(triton),
    )


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX, or the name is unknown
        return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_capability() -> DeviceCapability:
    name = _cpu_name() or "cpu"
    return DeviceCapability(
        device="cpu",
        vendor="cpu",
        name=name,
        compute_capability=(0, 0),
        sm_count=os.cpu_count() or 1,
        total_memory=_host_memory(),
        bf16=False,
        fp16=False,
        tf32=False,
        fp8_e4m3=False,
        fp8_e5m2=False,
        triton=triton_available(),
    )


def _normalize_device(device: str | int | torch.device | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device, bool):
        raise TypeError("device must be a torch.device, str, int or None, got bool")
    if isinstance(device, int):
        return torch.device("cuda", device)
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a valid device string: {exc}") from None
    if not isinstance(device, torch.device):
        raise TypeError(
            f"device must be a torch.device, str, int or None, got {type(device).__name__}"
        )
    if device.type == "cuda" and device.index is None:
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _detect_cached(device_type: str, index: int) -> DeviceCapability:
    if device_type == "cpu":
        return _cpu_capability()
    if not torch.cuda.is_available():
        raise ValueError(f"device 'cuda:{index}' was requested but CUDA is not available")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device index {index} out of range; this machine has {count} GPU(s)")
    props = DeviceProperties.from_torch(torch.cuda.get_device_properties(index))
    vendor: Vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
    return capability_from_properties(props, device=f"cuda:{index}", vendor=vendor)


def detect(device: str | int | torch.device | None = None) -> DeviceCapability:
    """Detect what a device supports natively; the result is cached per device.

    Args:
        device: ``None`` (the current CUDA device, or the CPU without CUDA), a
            ``torch.device``, a device string (``"cuda:1"``, ``"cpu"``) or a CUDA index.

    Returns:
        The device capability. For the CPU, every reduced precision is reported as not
        native (``bf16 = fp16 = tf32 = fp8 = False``), ``compute_capability == (0, 0)``,
        ``sm_count`` is the number of logical cores and ``total_memory`` the host memory.

    Raises:
        ValueError: If CUDA is requested but unavailable, the index is out of range, or the
            device type is neither ``cpu`` nor ``cuda``.
        TypeError: If ``device`` has an unsupported type.
    """
    dev = _normalize_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device type must be 'cpu' or 'cuda', got {dev.type!r}")
    index = (dev.index or 0) if dev.type == "cuda" else 0
    return _detect_cached(dev.type, index)
