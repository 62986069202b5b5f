"""Gauss Modality Noise Masking: shares, mix statistics, overrides, determinism, state."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from safetensors.torch import load as st_load  # bytes -> tensors, no pickle

from snag_dist.config.schema import ModalityNoise, NoiseConfig
from snag_dist.errors import ConfigError, DataError
from snag_dist.model import GaussModalityNoise, build_noise
from tests.model.model_helpers import make_spec

N, D = 20_000, 8


def stats(names=("image", "relation")) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for i, name in enumerate(names):
        out[name] = (torch.linspace(-2, 2, D) + i, torch.linspace(0.5, 1.5, D) * (i + 1))
    return out


def make_noise(**cfg) -> GaussModalityNoise:
    s = stats()
    s["structure"] = (torch.zeros(D), torch.ones(D))
    noise = GaussModalityNoise(NoiseConfig(**cfg), s, num_entities=N)
    noise.train()
    return noise


def within(share: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(share - p) < sigmas * math.sqrt(p * (1 - p) / n)


def test_noised_share_and_mix_statistics():
    noise = make_noise(noise_ratio=0.2, mask_ratio=0.7)
    noise.resample(epoch=0, seed=1)
    ids = torch.arange(N)
    x = torch.full((N, D), 3.0)
    out = noise("image", x, ids)
    mask = noise.last_mask("image")
    assert torch.equal(mask, noise.entity_mask("image"))
    assert within(mask.float().mean().item(), 0.2, N)
    assert torch.equal(out[~mask], x[~mask])  # untouched rows are exact
    mean, std = stats()["image"]
    noised = out[mask]
    k = noised.shape[0]
    want_mean, want_std = 0.3 * 3.0 + 0.7 * mean, 0.7 * std  # (1 - r) x + r eps, eps ~ N(mean, std)
    assert torch.all((noised.mean(0) - want_mean).abs() < 4 * want_std / math.sqrt(k))
    assert torch.all((noised.std(0) / want_std - 1).abs() < 5 / math.sqrt(2 * k))


def test_structure_uses_scaled_ratios_and_weight_stats():
    noise = make_noise(noise_ratio=0.2, mask_ratio=0.7, structure_scale=0.5)
    assert noise.ratios("structure") == pytest.approx((0.1, 0.35))
    weight = torch.randn(N, D) * 2 + 5
    noise.resample(epoch=0, seed=1, struct_weight=weight)
    mean, std = noise.stats("structure")
    assert torch.allclose(mean, weight.mean(0)) and torch.allclose(std, weight.std(0))
    out = noise("structure", torch.zeros(N, D), torch.arange(N))
    mask = noise.last_mask("structure")
    assert within(mask.float().mean().item(), 0.1, N)
    assert torch.allclose(out[mask].mean(0), 0.35 * weight.mean(0), atol=0.35 * 2 * 4 / math.sqrt(mask.sum()))


def test_modalities_draw_independently():
    noise = make_noise(noise_ratio=0.5)
    noise.resample(epoch=0, seed=1)
    both = (noise.entity_mask("image") & noise.entity_mask("relation")).float().mean().item()
    assert within(both, 0.25, N)


def test_per_modality_override():
    over = {"image": ModalityNoise(noise_ratio=0.5, mask_ratio=0.3), "structure": ModalityNoise(noise_ratio=0.4)}
    noise = make_noise(noise_ratio=0.2, mask_ratio=0.7, per_modality=over)
    assert noise.ratios("image") == (0.5, 0.3)
    assert noise.ratios("structure") == (0.4, 0.7)  # an explicit override is taken as is, not scaled
    assert noise.ratios("relation") == (0.2, 0.7)
    noise.resample(epoch=0, seed=3)
    assert within(noise.entity_mask("image").float().mean().item(), 0.5, N)
    assert within(noise.entity_mask("relation").float().mean().item(), 0.2, N)


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_off_in_eval_and_when_disabled(resample):
    x, ids = torch.randn(100, D), torch.arange(100)
    noise = make_noise(noise_ratio=1.0, resample=resample)
    noise.eval()
    out = noise("image", x, ids)
    assert out is x and not noise.last_mask("image").any()
    off = make_noise(enabled=False, noise_ratio=1.0, resample=resample)
    out = off("image", x, ids)
    assert out is x and torch.equal(out, x)


def test_deterministic_under_seed_and_new_draws_per_epoch():
    a, b = make_noise(), make_noise()
    x, ids = torch.randn(N, D), torch.arange(N)
    a.resample(epoch=4, seed=9)
    b.resample(epoch=4, seed=9)
    assert torch.equal(a("image", x, ids), b("image", x, ids))
    mask4 = a.entity_mask("image").clone()
    a.resample(epoch=5, seed=9)
    assert not torch.equal(a.entity_mask("image"), mask4)
    b.resample(epoch=4, seed=10)
    assert not torch.equal(b.entity_mask("image"), mask4)


def test_epoch_draws_are_indexed_by_entity_id():
    noise = make_noise(noise_ratio=0.5)
    noise.resample(epoch=0, seed=2)
    x = torch.randn(N, D)
    full = noise("image", x, torch.arange(N))
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:500]
    part = noise("image", x[ids], ids)  # a minibatch in any order sees the same noise per entity
    assert torch.equal(part, full[ids])


def test_step_mode_draws_anew_each_call_and_replays():
    a, b = make_noise(resample="step", noise_ratio=0.5), make_noise(resample="step", noise_ratio=0.5)
    x, ids = torch.randn(1000, D), torch.arange(1000)
    for n in (a, b):
        n.resample(epoch=0, seed=1)
    first, second = a("image", x, ids), a("image", x, ids)
    assert not torch.equal(first, second)
    assert torch.equal(b("image", x, ids), first) and torch.equal(b("image", x, ids), second)
    a.resample(epoch=0, seed=1)
    assert torch.equal(a("image", x, ids), first)


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_state_dict_round_trip(resample):
    a = make_noise(resample=resample, noise_ratio=0.5)
    a.resample(epoch=2, seed=5, struct_weight=torch.randn(N, D) + 1)
    x, ids = torch.randn(N, D), torch.arange(N)
    a("structure", x, ids)
    state = st_load(safetensors.torch.save(a.state_dict()))  # all tensors, safetensors-safe
    want = {name: a(name, x, ids) for name in ("structure", "image")}
    b = make_noise(resample=resample, noise_ratio=0.5)
    b.load_state_dict(state)
    for name in ("structure", "image"):
        assert torch.equal(b(name, x, ids), want[name])


def test_gradient_passes_through_the_clean_share():
    noise = make_noise(noise_ratio=0.5, mask_ratio=0.7)
    noise.resample(epoch=0, seed=0)
    x = torch.randn(200, D, requires_grad=True)
    noise("image", x, torch.arange(200)).sum().backward()
    mask = noise.last_mask("image")
    assert torch.allclose(x.grad[mask], torch.full_like(x.grad[mask], 0.3))
    assert torch.equal(x.grad[~mask], torch.ones_like(x.grad[~mask]))


def test_errors():
    noise = make_noise()
    noise.resample(epoch=0, seed=0)
    with pytest.raises(DataError, match="no GMNM statistics"):
        noise("name", torch.zeros(3, D), torch.arange(3))
    with pytest.raises(DataError, match="D=8"):
        noise("image", torch.zeros(3, D + 1), torch.arange(3))
    no_n = GaussModalityNoise(NoiseConfig(), stats(), num_entities=None).train()
    with pytest.raises(ConfigError, match="num_entities"):
        no_n("image", torch.zeros(3, D), torch.arange(3))


def test_build_noise_checks_overrides_and_stats():
    spec = make_spec()
    with pytest.raises(ConfigError, match="imgae"):
        build_noise(NoiseConfig(per_modality={"imgae": ModalityNoise()}), spec, ["structure", "image"], 16)
    bare = make_spec(with_stats=False)
    with pytest.raises(DataError, match="mean/std"):
        build_noise(NoiseConfig(), bare, ["structure", "image"], 16)
    off = NoiseConfig(per_modality={"image": ModalityNoise(noise_ratio=0.0)})
    assert build_noise(off, bare, ["structure", "image"], 16).names == ["structure"]
