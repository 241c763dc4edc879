"""Precision policies: presets, validation, serialisation, active-policy context."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch
from adaattn_precision import (
    PRECISIONS,
    PRESETS,
    FP8Config,
    PrecisionPolicy,
    get_active_policy,
    torch_dtype,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("name", PRESETS)
def test_presets_exist_and_round_trip(name: str) -> None:
    p = PrecisionPolicy.preset(name)
    assert p.name == name
    assert PrecisionPolicy.from_dict(p.to_dict()) == p
    assert PrecisionPolicy.from_json(p.to_json()) == p


def test_preset_contents() -> None:
    quality, balanced, speed = (PrecisionPolicy.preset(n) for n in PRESETS)
    assert not quality.allows_fp8
    assert balanced.allows_fp8
    assert speed.allows_fp8
    assert quality.tolerance < balanced.tolerance < speed.tolerance
    assert balanced.on_fp8_unavailable == "fallback"


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown precision policy preset 'fast'") as exc:
        PrecisionPolicy.preset("fast")
    for name in PRESETS:
        assert name in str(exc.value)


@pytest.mark.parametrize("tol", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_or_non_finite_tolerance_rejected(tol: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        PrecisionPolicy(tolerance=tol)


def test_validation_messages() -> None:
    with pytest.raises(TypeError, match="tolerance"):
        PrecisionPolicy(tolerance="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed"):
        PrecisionPolicy(allowed=("fp4",))
    with pytest.raises(ValueError, match="at least one"):
        PrecisionPolicy(allowed=())
    with pytest.raises(TypeError, match="allowed"):
        PrecisionPolicy(allowed="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicates"):
        PrecisionPolicy(allowed=("bf16", "bf16"))
    with pytest.raises(ValueError, match="on_fp8_unavailable"):
        PrecisionPolicy(on_fp8_unavailable="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fp8\.fmt"):
        PrecisionPolicy(allowed=("fp8_e5m2", "bf16"), fp8=FP8Config(fmt="e4m3"))
    with pytest.raises(ValueError, match="fmt"):
        FP8Config(fmt="e2m1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity"):
        FP8Config(granularity="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        FP8Config(block_size=0)
    with pytest.raises(ValueError, match="margin"):
        FP8Config(margin=-2)


def test_allowed_is_canonically_ordered_and_frozen() -> None:
    p = PrecisionPolicy(allowed=("fp32", "bf16", "fp8_e4m3"))
    assert p.allowed == ("fp8_e4m3", "bf16", "fp32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tolerance = 1.0  # type: ignore[misc]
    q = p.replace(tolerance=0.2)
    assert q.tolerance == 0.2
    assert p.tolerance != 0.2
    with pytest.raises(ValueError, match="tolerance"):
        p.replace(tolerance=0)


def test_from_dict_rejects_unknown_keys() -> None:
    d = PrecisionPolicy.preset("speed").to_dict()
    d["tolerence"] = 0.1
    with pytest.raises(ValueError, match="tolerence"):
        PrecisionPolicy.from_dict(d)
    d = PrecisionPolicy.preset("speed").to_dict()
    d["fp8"]["scale"] = 1
    with pytest.raises(ValueError, match="scale"):
        PrecisionPolicy.from_dict(d)
    with pytest.raises(ValueError, match="not valid JSON"):
        PrecisionPolicy.from_json("{tolerance: 1")


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(["e4m3", "e5m2"]),
    gran=st.sampled_from(["tensor", "block", "token"]),
    block=st.integers(1, 4096),
    margin=st.integers(0, 8),
    pow2=st.booleans(),
    smooth=st.booleans(),
    tol=st.floats(1e-6, 10.0, allow_nan=False),
    extra=st.sets(st.sampled_from(["bf16", "fp16", "fp32"])),
    behaviour=st.sampled_from(["error", "fallback"]),
)
def test_custom_policy_json_round_trip(
    fmt: str,
    gran: str,
    block: int,
    margin: int,
    pow2: bool,
    smooth: bool,
    tol: float,
    extra: set[str],
    behaviour: str,
) -> None:
    cfg = FP8Config(
        fmt=fmt,  # type: ignore[arg-type]
        granularity=gran,  # type: ignore[arg-type]
        block_size=block,
        margin=margin,
        pow2_scales=pow2,
        smooth_k=smooth,
    )
    p = PrecisionPolicy(
        name="mine",
        allowed=(f"fp8_{fmt}", *sorted(extra)),
        tolerance=tol,
        fp8=cfg,
        on_fp8_unavailable=behaviour,  # type: ignore[arg-type]
    )
    assert PrecisionPolicy.from_json(p.to_json()) == p
    assert FP8Config.from_dict(cfg.to_dict()) == cfg


def test_torch_dtype_mapping() -> None:
    assert torch_dtype("fp8_e4m3") == torch.float8_e4m3fn
    assert torch_dtype("fp8_e5m2") == torch.float8_e5m2
    assert torch_dtype("bf16") == torch.bfloat16
    assert [torch_dtype(p).itemsize for p in PRECISIONS] == [1, 1, 2, 2, 4]
    with pytest.raises(ValueError, match="precision name"):
        torch_dtype("float8")


def test_context_manager_sets_and_restores() -> None:
    default = get_active_policy()
    assert default == PrecisionPolicy.preset("balanced")
    quality, speed = PrecisionPolicy.preset("quality"), PrecisionPolicy.preset("speed")
    with quality as q:
        assert q is quality
        assert get_active_policy() is quality
        with speed:
            assert get_active_policy() is speed
            with quality:  # re-entering the same object nests too
                assert get_active_policy() is quality
            assert get_active_policy() is speed
        assert get_active_policy() is quality
    assert get_active_policy() == default


def test_context_restored_after_exception() -> None:
    speed = PrecisionPolicy.preset("speed")
    with pytest.raises(RuntimeError, match="boom"), speed:
        raise RuntimeError("boom")
    assert get_active_policy().name == "balanced"


def test_active_policy_is_per_thread() -> None:
    seen: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        seen.append(get_active_policy().name)

    with PrecisionPolicy.preset("quality"):
        t = threading.Thread(target=worker)
        t.start()
        barrier.wait()
        t.join()
    assert seen == ["balanced"]


def test_active_policy_is_per_task() -> None:
    async def use(name: str, delay: float) -> str:
        with PrecisionPolicy.preset(name):
            await asyncio.sleep(delay)
            return get_active_policy().name

    async def both() -> list[str]:
        return list(await asyncio.gather(use("quality", 0.02), use("speed", 0.0)))

    assert asyncio.run(both()) == ["quality", "speed"]
