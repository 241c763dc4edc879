"""CLI (doctor, bench, analyze), the analysis report and the offline test material."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from adaattn import assets
from adaattn.cli import main

# The `material_missing` fixture (conftest.py): skip, or fail where the material must be there.
MaterialMissing = Callable[[BaseException], NoReturn]


def test_doctor_json_reports_capability_and_self_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["capability"]["device"] == "cpu"
    assert report["self_check"]["ok"] is True
    assert report["self_check"]["max_abs_diff_vs_torch_sdpa"] < 1e-4
    assert set(report["kernels"]) >= {"dense (flash)", "fp8", "hybrid"}


def test_doctor_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "self-check" in out
    assert "ok" in out


def test_bench_runs_on_a_small_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--seq-len", "128", "--heads", "4", "--head-dim", "32", "--reps", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "torch SDPA" in out
    assert "adaattn exact" in out
    assert "plan:" in out


def test_cli_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--text-file", "/nonexistent/file.txt"]) == 2
    assert "error" in capsys.readouterr().out


def test_shakespeare_text_is_real_english(material_missing: MaterialMissing) -> None:
    try:
        text = assets.shakespeare_text("hamlet")
    except FileNotFoundError as exc:
        material_missing(exc)
    assert "To be, or not to be" in text
    assert len(text) > 100_000
    assert len(assets.shakespeare_text("macbeth", max_chars=500)) == 500
    with pytest.raises(FileNotFoundError, match="available"):
        assets.shakespeare_text("hamlet_the_sequel")


def test_wikipedia_text_has_no_markup(material_missing: MaterialMissing) -> None:
    try:
        text = assets.wikipedia_text(max_chars=50_000)
    except FileNotFoundError as exc:
        material_missing(exc)
    assert len(text) == 50_000
    assert "{{" not in text
    assert "[[" not in text
    assert "<ref" not in text
    assert text.startswith("Anarchism")


def test_word_similarity_sets_hold_rated_pairs(material_missing: MaterialMissing) -> None:
    try:
        wordsim = assets.word_similarity("wordsim353")
        simlex = assets.word_similarity("simlex999")
    except FileNotFoundError as exc:
        material_missing(exc)
    assert len(wordsim) == 353
    assert len(simlex) == 999
    assert wordsim[1] == ("tiger", "cat", 7.35)  # after the two comment lines
    assert ("tiger", "tiger", 10.0) in wordsim
    assert simlex[0] == ("old", "new", 1.58)
    for w1, w2, rating in wordsim + simlex:
        assert w1
        assert w2
        assert 0.0 <= rating <= 10.0
    with pytest.raises(ValueError, match="simlex999"):
        assets.word_similarity("men3000")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAATTN_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("ADAATTN_CACHE")
    assert assets.cache_dir().name == "adaattn"


def test_analyze_tiny_llama(tmp_path: Path, material_missing: MaterialMissing) -> None:
    transformers = pytest.importorskip("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())
    except FileNotFoundError as exc:
        material_missing(exc)
    from adaattn import AdaAttnConfig
    from adaattn.analysis import analyze_model

    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    stages: list[str] = []

    def progress(stage: str, total: int | None) -> object:
        stages.append(stage)
        return lambda: None

    config = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=16,
                                    hybrid_windows=(8, 16), hybrid_ranks=(4, 8))  # fmt: skip
    text = "The quick brown fox jumps over the lazy dog. " * 12
    result = analyze_model(model, tok, text, config=config, max_tokens=96, model_name="tiny",
                           progress=progress)  # type: ignore[arg-type]  # fmt: skip
    assert stages == ["exact pass", "adaptive pass (planning every layer)"]
    assert (result.layers, result.heads, result.tokens) == (2, 4, 96)
    assert all(0.0 <= e <= 1.0 for row in result.entropy for e in row)
    assert all(1.0 <= r <= 16.0 + 1e-4 for row in result.effective_rank for r in row)
    assert result.perplexity_exact is not None
    assert result.perplexity_adaptive is not None
    # a randomly initialised model: near-uniform predictions over the vocabulary
    assert math.isfinite(result.perplexity_exact)
    assert result.output_cosine is not None
    assert result.output_cosine > 0.9
    assert model.config._attn_implementation == "sdpa"  # switched back
    data = json.loads(result.save_json(tmp_path / "a.json").read_text())
    assert data["mode_counts"] == result.mode_counts()
    png = result.save_heatmaps(tmp_path / "h.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = result.save_html(tmp_path / "r.html", png=png).read_text()
    assert "<img" in page
    assert "data:image/png;base64," in page
    assert "tiny" in page


@pytest.mark.model
def test_analyze_cli_on_minilm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], material_missing: MaterialMissing
) -> None:
    pytest.importorskip("transformers")
    try:
        assets.minilm_dir()
    except FileNotFoundError as exc:
        material_missing(exc)
    code = main([
        "analyze", "--model", "minilm", "--max-tokens", "64", "--text",
        "Attention is all you need. " * 10, "--out", str(tmp_path), "--windows", "8,16",
        "--ranks", "4,8", "--sample-size", "16",
    ])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert len(data["mode"]) == 6
    assert len(data["mode"][0]) == 12
    assert data["perplexity_exact"] is None  # an encoder
    assert (tmp_path / "heatmaps.png").stat().st_size > 10_000
    assert "report.html" in capsys.readouterr().out
