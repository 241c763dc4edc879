from __future__ import annotations

import dataclasses
import json

import pytest
from adaattn import MODES, AdaAttnConfig
from adaattn_precision import PrecisionPolicy


def test_default_is_exact() -> None:
    cfg = AdaAttnConfig()
    assert cfg.is_exact
    assert cfg.modes == ("exact",)
    assert cfg.replan_interval is None


def test_adaptive_allows_every_mode_and_keeps_options() -> None:
    cfg = AdaAttnConfig.adaptive(0.03, sample_size=32, replan=4)
    assert cfg.modes == MODES
    assert not cfg.is_exact
    assert cfg.resolved_tolerance() == 0.03
    assert cfg.sample_size == 32
    assert cfg.replan_interval == 4
    assert cfg.resolved_policy().name == "balanced"


def test_modes_are_canonically_ordered() -> None:
    assert AdaAttnConfig(modes=("hybrid", "exact")).modes == ("exact", "hybrid")


def test_policy_preset_name_becomes_policy() -> None:
    cfg = AdaAttnConfig(policy="speed")
    assert isinstance(cfg.policy, PrecisionPolicy)
    assert cfg.policy.name == "speed"
    # tolerance None: the policy's
    assert cfg.resolved_tolerance() == PrecisionPolicy.preset("speed").tolerance


def test_policy_none_follows_the_active_policy() -> None:
    cfg = AdaAttnConfig(modes=MODES)
    with PrecisionPolicy.preset("quality"):
        assert cfg.resolved_policy().name == "quality"
        assert cfg.resolved_tolerance() == PrecisionPolicy.preset("quality").tolerance
    with PrecisionPolicy.preset("speed"):
        assert cfg.resolved_policy().name == "speed"


def test_replan_choices() -> None:
    assert AdaAttnConfig(replan="every_call").replan_interval == 1
    assert AdaAttnConfig(replan=7).replan_interval == 7
    assert AdaAttnConfig(replan="per_bucket").replan_interval is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"tolerance": 1.5}, ValueError, "tolerance"),
        ({"tolerance": float("nan")}, ValueError, "tolerance"),
        ({"tolerance": "0.1"}, TypeError, "tolerance"),
        ({"policy": "fastest"}, ValueError, "policy"),
        ({"policy": 3}, TypeError, "policy"),
        ({"modes": "exact"}, TypeError, "modes"),
        ({"modes": ("fp8",)}, ValueError, "exact"),
        ({"modes": ("exact", "int4")}, ValueError, "int4"),
        ({"modes": ("exact", "exact")}, ValueError, "duplicates"),
        ({"sample_size": 0}, ValueError, "sample_size"),
        ({"sample_size": 2.5}, TypeError, "sample_size"),
        ({"predict_samples": 0}, ValueError, "predict_samples"),
        ({"predict_samples": None}, TypeError, "predict_samples"),
        ({"replan": "sometimes"}, ValueError, "replan"),
        ({"replan": 0}, ValueError, "replan"),
        ({"replan": True}, TypeError, "replan"),
        ({"min_seq_len": -1}, ValueError, "min_seq_len"),
        ({"hybrid_windows": ()}, ValueError, "hybrid_windows"),
        ({"hybrid_ranks": (0, 8)}, ValueError, "hybrid_ranks"),
        ({"hybrid_ranks": 8}, TypeError, "hybrid_ranks"),
        ({"seed": -2}, ValueError, "seed"),
    ],
)
def test_validation_names_the_argument(kwargs: dict[str, object], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        AdaAttnConfig(**kwargs)  # type: ignore[arg-type]


def test_frozen_and_replace_revalidates() -> None:
    cfg = AdaAttnConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tolerance = 0.1  # type: ignore[misc]
    assert cfg.replace(tolerance=0.2).tolerance == 0.2
    with pytest.raises(ValueError, match="tolerance"):
        cfg.replace(tolerance=-1.0)


def test_to_dict_is_json() -> None:
    cfg = AdaAttnConfig.adaptive(0.05)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["modes"] == list(MODES)
    assert data["policy"]["name"] == "balanced"
    assert data["tolerance"] == 0.05
