"""Test configuration: GPU-marked tests skip, with the reason, where no CUDA device exists.

Tests that need packaged test material (SmolLM2, MiniLM, the texts) skip where it is absent,
except in a session that installed it (``nox -s tests-cpu`` sets
``ADAATTN_REQUIRE_TEST_MATERIAL=1``): there a missing model is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import pytest
import torch


@pytest.fixture(scope="session")
def material_missing() -> Callable[[BaseException], NoReturn]:
    def missing(exc: BaseException) -> NoReturn:
        message = f"test material unavailable: {exc}"
        if os.environ.get("ADAATTN_REQUIRE_TEST_MATERIAL") == "1":
            pytest.fail(message)
        pytest.skip(message)

    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `nox -s tests-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
