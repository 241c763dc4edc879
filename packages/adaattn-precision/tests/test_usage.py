"""PrecisionStats: counting, merging, resetting, printing, fallbacks."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch
from adaattn_precision import (
    DeviceProperties,
    PrecisionPolicy,
    PrecisionStats,
    capability_from_properties,
    select_precision,
    tensor_stats,
)
from adaattn_precision.calibrate import synthetic_qkv

H100 = capability_from_properties(
    DeviceProperties("NVIDIA H100 80GB HBM3", 9, 0, 132, 85_029_158_912), triton=True
)
T4 = capability_from_properties(DeviceProperties("Tesla T4", 7, 5, 40, 15_655_829_504), triton=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The error model works on many small tensors; intra-op threads only add overhead
    # (and thrash on a busy 2-core CI runner). Restored after each test.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plans() -> tuple:
    # 4 heads: two benign (FP8 meets the tolerance), two with large scores (they do not).
    q1, k1, v1 = synthetic_qkv(seq_len=128, head_dim=64, heads=2, seed=1)
    q2, k2, v2 = synthetic_qkv(seq_len=128, head_dim=64, heads=2, q_scale=4.0, q_outliers=3, seed=2)
    q, k, v = (torch.cat(t, dim=1) for t in ((q1, q2), (k1, k2), (v1, v2)))
    stats = tensor_stats(q), tensor_stats(k), tensor_stats(v)
    policy = PrecisionPolicy.preset("balanced")
    return (
        select_precision(*stats, policy, H100, scale=1 / math.sqrt(64)),
        select_precision(*stats, policy, T4, scale=1 / math.sqrt(64)),
    )


def test_record_counts_and_fallbacks() -> None:
    on_h100, on_t4 = _plans()
    assert on_h100.precisions[:2] == ("fp8_e4m3", "fp8_e4m3")
    assert "fp8_e4m3" not in on_h100.precisions[2:]
    stats = PrecisionStats()
    stats.record(on_h100, layer=0)
    stats.record(on_h100, layer=0)
    stats.record(on_t4, layer="decoder.1")
    assert stats.calls == 3
    assert stats.total == 12
    assert stats.by_dtype["fp8_e4m3"] == 4
    assert stats.by_layer[("0", "fp8_e4m3")] == 4
    assert stats.by_head[("0", 1, "fp8_e4m3")] == 2
    # T4: no FP8 -> the two benign heads fell back (fp16; T4 has no native bf16)
    assert on_t4.precisions[:2] == ("fp16", "fp16")
    assert stats.num_fallbacks == 2
    assert all(lay == "decoder.1" for lay, _, _ in stats.fallbacks)
    assert "not native" in stats.fallbacks[0][2]
    assert stats.fraction("fp8_e4m3") == pytest.approx(4 / 12)


def test_merge_add_and_reset() -> None:
    on_h100, on_t4 = _plans()
    a, b = PrecisionStats(), PrecisionStats()
    a.record(on_h100, layer=0)
    b.record(on_t4, layer=1)
    c = a + b
    assert c.calls == 2
    assert c.total == 8
    assert c.by_dtype == a.by_dtype + b.by_dtype
    assert c.fallbacks == b.fallbacks
    assert a.merge(b).to_dict() == c.to_dict()
    assert a.calls == 1  # merge does not mutate
    json.dumps(c.to_dict())
    c.reset()
    assert c.calls == 0
    assert c.total == 0
    assert not c.fallbacks
    assert c.fraction("bf16") == 0.0
    with pytest.raises(TypeError):
        a + 1  # type: ignore[operator]


def test_table_text() -> None:
    on_h100, on_t4 = _plans()
    stats = PrecisionStats()
    stats.record(on_h100, layer=0)
    stats.record(on_t4, layer=1)
    text = str(stats)
    assert text == stats.to_table()
    assert "fp8_e4m3" in text
    assert "fp16" in text
    lines = text.splitlines()
    row0 = next(line for line in lines if line.startswith("0 "))
    assert row0.split()[1] == str(stats.by_layer[("0", "fp8_e4m3")])
    assert "fallbacks (2):" in text
    assert "total" in text
    short = stats.to_table(max_fallbacks=1)
    assert "... 1 more" in short


def test_bad_arguments() -> None:
    stats = PrecisionStats()
    with pytest.raises(TypeError, match="plan"):
        stats.record("fp8")  # type: ignore[arg-type]
    on_h100, _ = _plans()
    with pytest.raises(TypeError, match="layer"):
        stats.record(on_h100, layer=1.5)  # type: ignore[arg-type]
