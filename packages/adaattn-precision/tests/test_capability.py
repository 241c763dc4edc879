"""Capability rules from real-shaped device properties, and detect() on this machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adaattn_precision import (
    DeviceCapability,
    DeviceProperties,
    capability_from_properties,
    detect,
    triton_available,
)

GiB = 2**30

# Properties as torch.cuda.get_device_properties reports them on these cards.
CARDS = {
    "H100": DeviceProperties("NVIDIA H100 80GB HBM3", 9, 0, 132, 85_029_158_912),
    "A100": DeviceProperties("NVIDIA A100-SXM4-80GB", 8, 0, 108, 85_097_971_712),
    "V100": DeviceProperties("Tesla V100-SXM2-32GB", 7, 0, 80, 34_089_730_048),
    "T4": DeviceProperties("Tesla T4", 7, 5, 40, 15_655_829_504),
    "L4": DeviceProperties("NVIDIA L4", 8, 9, 58, 23_580_639_232),
    "RTX4090": DeviceProperties("NVIDIA GeForce RTX 4090", 8, 9, 128, 25_393_692_672),
    "B200": DeviceProperties("NVIDIA B200", 10, 0, 148, 191_537_545_216),
    "P100": DeviceProperties("Tesla P100-PCIE-16GB", 6, 0, 56, 17_071_734_784),
}

#                  bf16   fp16   tf32   fp8
EXPECTED = {
    "H100": (True, True, True, True),
    "A100": (True, True, True, False),
    "V100": (False, True, False, False),
    "T4": (False, True, False, False),
    "L4": (True, True, True, True),
    "RTX4090": (True, True, True, True),
    "B200": (True, True, True, True),
    "P100": (False, False, False, False),
}


@pytest.mark.parametrize("card", sorted(CARDS))
def test_native_support_by_compute_capability(card: str) -> None:
    props = CARDS[card]
    cap = capability_from_properties(props, device="cuda:3", triton=True)
    bf16, fp16, tf32, fp8 = EXPECTED[card]
    assert (cap.bf16, cap.fp16, cap.tf32) == (bf16, fp16, tf32)
    assert cap.fp8_e4m3 == cap.fp8_e5m2 == cap.fp8 == fp8
    assert cap.compute_capability == (props.major, props.minor)
    assert cap.sm_count == props.multi_processor_count
    assert cap.total_memory == props.total_memory
    assert cap.name == props.name
    assert cap.device == "cuda:3"
    assert cap.triton is True
    assert cap.is_cuda
    assert cap.supports("fp32")
    assert cap.supports("fp8_e4m3") == fp8
    assert cap.supports("bf16") == bf16


def test_h100_record_matches_spec() -> None:
    cap = capability_from_properties(CARDS["H100"], triton=False)
    assert cap.compute_capability == (9, 0)
    assert cap.sm_count == 132
    assert 79 * GiB < cap.total_memory < 81 * GiB
    assert cap.fp8
    assert cap.bf16
    assert not cap.triton


def test_bf16_not_reported_through_emulation() -> None:
    # torch.cuda.is_bf16_supported() says True on a T4 (emulated); the rule must not.
    assert not capability_from_properties(CARDS["T4"]).bf16


def test_amd_gpu_is_conservative_about_fp8() -> None:
    mi300 = DeviceProperties("AMD Instinct MI300X", 9, 4, 304, 205_822_885_888)
    cap = capability_from_properties(mi300, vendor="amd", triton=True)
    assert cap.bf16
    assert cap.fp16
    assert not cap.fp8
    assert not cap.tf32
    assert cap.vendor == "amd"


def test_capability_is_frozen_and_serialisable() -> None:
    cap = capability_from_properties(CARDS["A100"], triton=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cap.bf16 = False  # type: ignore[misc]
    d = cap.to_dict()
    assert d["compute_capability"] == [8, 0]
    assert DeviceCapability(**{**d, "compute_capability": (8, 0)}) == cap


def test_properties_validation() -> None:
    with pytest.raises(TypeError, match="major"):
        DeviceProperties("x", "9", 0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multi_processor_count"):
        DeviceProperties("x", 9, 0, -1, 1)
    with pytest.raises(TypeError, match="props must be a DeviceProperties"):
        capability_from_properties(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vendor"):
        capability_from_properties(CARDS["H100"], vendor="cpu")


def test_from_torch_reads_the_needed_fields() -> None:
    # Any object with the get_device_properties attribute names works.
    @dataclasses.dataclass
    class _Props:
        name: str = "NVIDIA L4"
        major: int = 8
        minor: int = 9
        multi_processor_count: int = 58
        total_memory: int = 23_580_639_232
        uuid: str = "ignored"

    assert DeviceProperties.from_torch(_Props()) == CARDS["L4"]


def test_detect_cpu_is_well_defined_and_cached() -> None:
    cap = detect("cpu")
    assert cap is detect(torch.device("cpu"))
    assert cap.device == "cpu"
    assert cap.vendor == "cpu"
    assert cap.name
    assert cap.compute_capability == (0, 0)
    assert cap.sm_count >= 1
    assert not (cap.bf16)
    assert not (cap.fp16)
    assert not (cap.tf32)
    assert not (cap.fp8_e4m3)
    assert not (cap.fp8_e5m2)
    assert cap.triton == triton_available()
    assert not cap.is_cuda


def test_detect_default_device() -> None:
    cap = detect()
    if torch.cuda.is_available():
        assert cap.device == f"cuda:{torch.cuda.current_device()}"
    else:
        assert cap is detect("cpu")


def test_detect_bad_devices() -> None:
    with pytest.raises(ValueError, match="not a valid device"):
        detect("gpu:0")
    with pytest.raises(ValueError, match="device type"):
        detect("meta")
    with pytest.raises(TypeError, match="device must be"):
        detect(1.5)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            detect("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            detect(0)


def test_triton_detection_does_not_import_triton() -> None:
    import subprocess
    import sys

    code = (
        "import sys, adaattn_precision as p; p.detect('cpu');"
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_detect_real_gpu() -> None:
    cap = detect(0)
    assert cap.name
    assert cap.sm_count > 0
    assert cap.total_memory > 0
    props = torch.cuda.get_device_properties(0)
    assert cap.compute_capability == (props.major, props.minor)
    assert cap.fp8_e4m3 == (cap.compute_capability >= (8, 9))
    assert cap.fp8_e5m2 == (cap.compute_capability >= (8, 9))
    assert cap.bf16 == (cap.compute_capability >= (8, 0))
    if "H100" in cap.name:
        assert cap.compute_capability == (9, 0)
        assert cap.fp8
    assert detect("cuda:0") is cap
