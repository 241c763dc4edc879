from __future__ import annotations

import adaattn
import pytest
import torch
import torch.nn.functional as F
from adaattn import AdaAttnConfig, AdaptiveAttention
from adaattn.synthetic import HEAD_KINDS, structured_qkv
from torch import nn


def test_default_module_equals_sdpa_with_gqa_and_mask() -> None:
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 8, 33, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 40, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 40, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 1, 33, 40, generator=gen) > 0.2
    attn = AdaptiveAttention()
    out = attn(q, k, v, mask, enable_gqa=True, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert attn.config.is_exact
    assert attn.plan is None  # exact configs never plan
    assert attn.stats.calls == 0


class _TorchSDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class _Block(nn.Module):
    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.attn = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return self.attn(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 32)


def test_module_is_a_drop_in_submodule() -> None:
    # The same block with AdaptiveAttention or torch SDPA as its attention core, float64: equal
    # output and weight gradients (the exact path computes in float64 for float64 inputs).
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    dy = torch.randn(2, 10, 32, dtype=torch.float64)
    results = []
    for core in (AdaptiveAttention(layer_idx=5), _TorchSDPA()):
        torch.manual_seed(0)
        block = _Block(core).double()
        y = block(x)
        (y * dy).sum().backward()
        assert block.qkv.weight.grad is not None
        results.append((y.detach(), block.qkv.weight.grad, block.qkv.bias.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert "layer_idx=5" in repr(_Block(AdaptiveAttention(layer_idx=5)))


def test_module_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="config"):
        AdaptiveAttention("exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer_idx"):
        AdaptiveAttention(layer_idx=-1)


def test_module_dropout_falls_back_in_training() -> None:
    attn = AdaptiveAttention()
    q = k = v = torch.randn(1, 2, 8, 8)
    adaattn.reset_dispatch_stats()
    with pytest.warns(adaattn.AdaAttnFallbackWarning):
        attn(q, k, v, dropout_p=0.1)
    assert sum(adaattn.dispatch_stats().fallback.values()) == 1


def test_structured_qkv_shapes_and_errors() -> None:
    q, k, v = structured_qkv(HEAD_KINDS, batch=2, seq_len=64, head_dim=16, dtype=torch.float64)
    assert q.shape == k.shape == v.shape == (2, 4, 64, 16)
    assert q.dtype == torch.float64
    with pytest.raises(ValueError, match="kind"):
        structured_qkv(("local", "global"))
    with pytest.raises(ValueError, match="head_dim"):
        structured_qkv(head_dim=7)
    with pytest.raises(ValueError, match="seq_len"):
        structured_qkv(seq_len=1)


def test_adaptive_module_plans_per_layer() -> None:
    q, k, v = structured_qkv(("local", "content"), seq_len=256, seed=2)
    cfg = AdaAttnConfig.adaptive(0.05, policy="quality", min_seq_len=0, sample_size=32)
    layers = [AdaptiveAttention(cfg, layer_idx=i) for i in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer(q, k, v, is_causal=True)
    assert [layer.plan.layer for layer in layers if layer.plan] == [0, 1]
