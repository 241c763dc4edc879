"""The package stands alone: in its own nox session neither triton nor any sibling is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

OTHERS = (
    "triton",
    *(
        s
        for s in ("adaattn", "adaattn_kernels", "adaattn_linalg", "adaattn_precision")
        if s != "adaattn_linalg"
    ),
)


@pytest.mark.skipif(
    os.environ.get("ADAATTN_STANDALONE") != "adaattn-linalg",
    reason="only meaningful in the package's own session (nox -s tests-linalg)",
)
def test_nothing_else_is_installed() -> None:
    for name in OTHERS:
        assert importlib.util.find_spec(name) is None, f"{name} is installed beside adaattn-linalg"


def test_import_pulls_in_no_triton_and_no_sibling() -> None:
    code = (
        "import sys, adaattn_linalg; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {OTHERS!r}]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing adaattn_linalg imported {proc.stdout} {proc.stderr}"
