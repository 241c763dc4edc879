"""``python -m adaattn_precision`` prints a readable capability table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from adaattn_precision import detect
from adaattn_precision.__main__ import main


def test_plain_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--plain"]) == 0
    out = capsys.readouterr().out
    assert "adaattn-precision" in out
    for label in ("compute capability", "bf16 native", "fp8 e4m3 native", "triton available"):
        assert label in out
    assert "cpu" in out
    assert detect("cpu").name in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == [detect("cpu").to_dict()]


def test_falls_back_to_plain_text_without_rich(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes `import rich...` raise ImportError.
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "bf16 native" in out
    assert "┃" not in out
    assert "│" not in out


def test_bad_device_exits_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "tpu:0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adaattn_precision", "--plain"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fp8 e5m2 native" in proc.stdout


def test_rich_table(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    assert main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fp8 e4m3 native" in out
    assert "cpu" in out
