"""Fusion: modality weights, masking of absent modalities, registry."""

from __future__ import annotations

import math

import pytest
import torch

from snag_dist.errors import ConfigError
from snag_dist.model import FUSIONS, ConcatFusion, TransformerFusion
from snag_dist.model.fusion import build_fusion
from tests.model.model_helpers import make_cfg

E, M, H = 12, 4, 16


def tokens_and_present(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    present = torch.ones(E, M, dtype=torch.bool)
    present[::2, 3] = False
    present[1::4, 1] = False
    return torch.randn(E, M, H, generator=gen), present


@pytest.mark.parametrize("name", FUSIONS.names())
def test_every_fusion_gives_weights_that_sum_to_one_and_zero_for_absent(name):
    torch.manual_seed(0)
    fusion = build_fusion(make_cfg(fusion=name), M)
    tokens, present = tokens_and_present()
    out = fusion(tokens, present)
    assert out.hidden.shape == (E, M, H) and out.modality_weights.shape == (E, M)
    assert torch.allclose(out.modality_weights.sum(-1), torch.ones(E))
    assert torch.all(out.modality_weights[~present] == 0)
    assert torch.all(out.modality_weights[present] > 0)


@pytest.mark.parametrize("layers,use_intermediate", [(1, True), (2, False)])
def test_transformer_weights_follow_the_attention_formula(layers, use_intermediate):
    torch.manual_seed(0)
    cfg = make_cfg(fusion_layers=layers, use_intermediate=use_intermediate, fusion_heads=2)
    fusion = TransformerFusion(cfg, M)
    tokens = torch.randn(E, M, H)
    present = torch.ones(E, M, dtype=torch.bool)
    out = fusion(tokens, present)
    assert out.attention.shape == (E, 2, M, M)
    assert torch.allclose(out.attention.sum(-1), torch.ones(E, 2, M))
    received = out.attention.sum(dim=(1, 2))  # over heads and query tokens
    want = torch.softmax(received / math.sqrt(M * 2), dim=-1)
    assert torch.allclose(out.modality_weights, want, atol=1e-6)


def test_absent_tokens_are_masked_as_keys():
    torch.manual_seed(0)
    fusion = TransformerFusion(make_cfg(), M).eval()
    tokens, present = tokens_and_present()
    out = fusion(tokens, present)
    key_absent = ~present[:, None, None, :].expand_as(out.attention)
    assert torch.all(out.attention[key_absent] == 0)
    changed = tokens.clone()
    changed[~present] = torch.randn(int((~present).sum()), H) * 100  # garbage in absent slots
    again = fusion(changed, present)
    assert torch.allclose(again.hidden[present], out.hidden[present], atol=1e-5)
    assert torch.allclose(again.modality_weights, out.modality_weights, atol=1e-6)


def test_concat_fusion_passes_tokens_and_uses_learned_weights():
    fusion = ConcatFusion(make_cfg(fusion="concat"), M)
    with torch.no_grad():
        fusion.global_weights.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    tokens = torch.randn(E, M, H)
    out = fusion(tokens, torch.ones(E, M, dtype=torch.bool))
    assert out.hidden is tokens and out.attention is None
    assert torch.allclose(out.modality_weights, torch.softmax(fusion.global_weights, 0).expand(E, M))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown fusion 'gru' \(known: concat, transformer\)"):
        build_fusion(make_cfg(fusion="gru"), M)
    with pytest.raises(ConfigError, match="divisible"):
        TransformerFusion(make_cfg(hidden=10, fusion_heads=3), M)


@pytest.mark.parametrize("present", [True, False])
def test_single_token_attention_skips_query_and_key_bit_for_bit(present):
    """One token: the shortcut equals the full attention exactly, outputs and value gradients."""
    from snag_dist.model.fusion import SelfAttention

    torch.manual_seed(0)
    att = SelfAttention(16, 2, dropout=0.0)
    h = torch.randn(37, 1, 16, requires_grad=True)
    mask = torch.full((37, 1), present)
    fast, probs = att(h, mask)
    slow, slow_probs = att.attend(h, mask)
    assert torch.equal(fast, slow) and torch.equal(probs, slow_probs)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [h, att.value.weight], g)
    grads_slow = torch.autograd.grad(slow, [h, att.value.weight, att.query.weight], g)
    assert torch.equal(grads_fast[0], grads_slow[0]) and torch.equal(grads_fast[1], grads_slow[1])
    assert not grads_slow[2].any()  # the query gets exactly no gradient on the full path either
    att.train()
    att.dropout.p = 0.5  # with attention dropout the single weight is not 1: the full path runs
    torch.manual_seed(1)
    a, _ = att(h, mask)
    torch.manual_seed(1)
    b, _ = att.attend(h, mask)
    assert torch.equal(a, b)


def test_attention_matches_per_entity_per_head_products():
    """The einsum path: context and probabilities equal softmax(q k^T / sqrt(d)) v computed one entity
    and one head at a time, absent keys masked; the gradients of the inputs and weights match too."""
    from snag_dist.model.fusion import SelfAttention

    torch.manual_seed(0)
    heads, d = 2, H // 2
    att = SelfAttention(H, heads, dropout=0.0)
    tokens, present = tokens_and_present()
    h = tokens.double().requires_grad_()
    att = att.double()
    context, probs = att.attend(h, present)
    q, k, v = att.query(h), att.key(h), att.value(h)
    want_ctx, want_probs = torch.zeros_like(context), torch.zeros_like(probs)
    for e in range(E):
        for j in range(heads):
            cols = slice(j * d, (j + 1) * d)
            scores = q[e, :, cols] @ k[e, :, cols].T / math.sqrt(d)  # (M query, M key)
            p = torch.softmax(scores.masked_fill(~present[e][None, :], -math.inf), dim=-1)
            want_probs[e, j] = p
            want_ctx[e, :, cols] = p @ v[e, :, cols]
    assert torch.allclose(probs, want_probs, atol=1e-12) and torch.allclose(context, want_ctx, atol=1e-12)
    g = torch.randn_like(context)
    got = torch.autograd.grad(context, [h, att.query.weight, att.value.weight], g, retain_graph=True)
    want = torch.autograd.grad(want_ctx, [h, att.query.weight, att.value.weight], g)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
