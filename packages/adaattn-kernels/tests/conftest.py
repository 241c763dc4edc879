"""Test configuration: GPU-marked tests skip, with the reason, where no CUDA device exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The compile tests share `sm90_compile.py`; make it importable under every pytest import mode
# (prepend adds this folder itself, importlib does not).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `nox -s tests-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
