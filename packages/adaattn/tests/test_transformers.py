"""transformers integration: tiny random models (always) and the packaged real models (model)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs `pip install adaattn[transformers]`"
)

import adaattn  # noqa: E402
from adaattn import AdaAttnConfig  # noqa: E402
from adaattn.integrations import transformers as adaattn_hf  # noqa: E402

# The `material_missing` fixture (conftest.py): skip, or fail where the material must be there.
MaterialMissing = Callable[[BaseException], NoReturn]


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    adaattn_hf.register()
    adaattn_hf.register(
        "adaattn-test-adaptive",
        config=AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=16, sample_size=16),
    )


def tiny_llama(attn: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(attn: str) -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_tiny_llama_matches_sdpa_with_padding_and_cache() -> None:
    model = tiny_llama("sdpa")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("adaattn")
        adaattn.reset_dispatch_stats()
        out = model(input_ids=ids, attention_mask=mask).logits
        assert adaattn.dispatch_stats().exact == 2  # one call per layer
        # float32 through two layers: accumulation order only
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-5)
        greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        model.set_attn_implementation("sdpa")
        assert torch.equal(greedy, model.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_tiny_bert_matches_sdpa() -> None:
    model = tiny_bert("sdpa")
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("adaattn")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-5)
    assert sorted(adaattn_hf.planners(model)) == [0, 1]


def test_adaptive_registration_plans_every_layer() -> None:
    model = tiny_llama("adaattn-test-adaptive")
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
    plans = adaattn_hf.plans(model)
    assert sorted(plans) == [0, 1]
    assert all(len(p.heads) == 4 and p.seq_k == 64 for p in plans.values())


def test_attention_function_contract() -> None:
    model = tiny_llama("sdpa")
    attn_module = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 9, 16)
    k = v = torch.randn(2, 2, 9, 16)
    out, weights = adaattn_hf.attention_forward(attn_module, q, k, v, None, scaling=0.25)
    assert weights is None
    assert out.shape == (2, 9, 4, 16)  # (B, S, H, D), as transformers expects
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="softcap"):
        adaattn_hf.attention_forward(attn_module, q, k, v, None, softcap=30.0)


def test_register_validates_names() -> None:
    with pytest.raises(ValueError, match="sdpa"):
        adaattn_hf.register("sdpa")
    with pytest.raises(ValueError, match="name"):
        adaattn_hf.register("")
    with pytest.raises(TypeError, match="config"):
        adaattn_hf.register("x", config="fast")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="register"):
        adaattn_hf.registered("never-registered")
    assert "adaattn" in transformers.AttentionInterface._global_mapping


@pytest.fixture(scope="module")
def smollm2(material_missing: MaterialMissing) -> tuple[torch.nn.Module, object]:
    from adaattn import assets

    try:
        return assets.load_smollm2(attn_implementation="sdpa")
    except (FileNotFoundError, ImportError) as exc:
        material_missing(exc)


@pytest.mark.model
def test_smollm2_adaattn_matches_sdpa(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tok = smollm2
    batch = tok(["To be, or not to be, that is the question:"], return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(**batch, labels=batch.input_ids)
        model.set_attn_implementation("adaattn")
        out = model(**batch, labels=batch.input_ids)
    # float32, 30 layers: differences are summation order only (logits are O(10))
    torch.testing.assert_close(out.logits, ref.logits, atol=5e-4, rtol=1e-4)
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=1e-5)


@pytest.fixture(scope="module")
def minilm(material_missing: MaterialMissing) -> tuple[torch.nn.Module, object]:
    from adaattn import assets

    try:
        return assets.load_minilm(attn_implementation="sdpa")
    except (FileNotFoundError, ImportError) as exc:
        material_missing(exc)


@pytest.mark.model
def test_minilm_embeddings_match_sdpa(minilm: tuple[torch.nn.Module, object]) -> None:
    model, tok = minilm
    batch = tok(  # type: ignore[operator]
        ["A man is eating food.", "A man is riding a horse on a sunny beach."],
        return_tensors="pt", padding=True,
    )  # fmt: skip

    def embed() -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        m = batch.attention_mask[..., None].float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = embed()
        model.set_attn_implementation("adaattn")
        out = embed()
    cos = (out * ref).sum(-1)
    assert torch.all(cos > 1 - 1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_position_bias_matches_transformers_sdpa(mask_kind: str) -> None:
    import inspect

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if "position_bias" not in inspect.signature(sdpa_attention_forward).parameters:
        pytest.skip("this transformers version's sdpa path has no position_bias")
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 12, 12, generator=gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
        mask[1, :, :, :3] = False
        mask[1, :, :3, 0] = True  # keep every row attending somewhere
    ours, _ = adaattn_hf.attention_forward(module, q, k, v, mask, position_bias=bias)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, position_bias=bias)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
