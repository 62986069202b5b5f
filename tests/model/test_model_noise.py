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
from snag_dist.model.noise import (
    DropoutKeys,
    KeyedDropout,
    keyed_below,
    keyed_hash,
    keyed_keep,
    keyed_normal,
    keyed_uniform,
    use_keyed_dropout,
)
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


# ---- keyed draws (the stream path): a pure function of (seed, epoch[, step], modality, entity id) ----
def make_keyed(**cfg) -> GaussModalityNoise:
    s = stats()
    s["structure"] = (torch.zeros(D), torch.ones(D))
    noise = GaussModalityNoise(NoiseConfig(**cfg), s, keyed=True)  # no num_entities: nothing N-sized
    noise.train()
    return noise


def by_id(ids: torch.Tensor) -> torch.Tensor:
    """Inputs that are a function of the entity id, so any batch holds the same row for an entity."""
    return torch.sin(ids[:, None].double() * 0.37 + torch.arange(D)).float()


def splitmix64_ref(key: int, e: int) -> int:
    """Pure-Python splitmix64: output e+1 of the stream seeded with key, as an unsigned 64-bit int."""
    m = (1 << 64) - 1
    z = (key + (e + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_keyed_hash_is_splitmix64():
    ids = torch.tensor([0, 1, 2, 5, 77, 123_456_789, 2**40 + 3, 2**62])
    for key in (0, 1, 2**62 + 12345, 2**63 - 1):
        got = keyed_hash(key, ids).tolist()
        assert [g & ((1 << 64) - 1) for g in got] == [splitmix64_ref(key, e) for e in ids.tolist()]
    u = keyed_uniform(7, torch.arange(10_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    for p in (0.0, 0.2, 0.5, 1.0):
        assert torch.equal(keyed_below(7, torch.arange(10_000), p), u < p)


def test_keyed_normal_shapes_and_moments():
    z = keyed_normal(3, torch.arange(20_000), 7)  # odd D: the last sin half is dropped
    assert z.shape == (20_000, 7) and z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    n = z.shape[0]
    assert torch.all(z.mean(0).abs() < 4 / math.sqrt(n))
    assert torch.all((z.std(0) - 1).abs() < 5 / math.sqrt(2 * n))
    assert within((z.abs() < 1).float().mean().item(), 0.682689, z.numel())  # Gaussian, not just unit variance
    corr = torch.corrcoef(z.T)  # the Box-Muller pair (j, j + J) and all other dims uncorrelated
    assert (corr - torch.eye(7)).abs().max() < 4 / math.sqrt(n)
    assert torch.equal(keyed_normal(3, torch.tensor([19_999, 4]), 7), z[[19_999, 4]])


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_keyed_same_entity_same_noise_in_any_batch(resample):
    a, b = make_keyed(noise_ratio=1.0, resample=resample), make_keyed(noise_ratio=1.0, resample=resample)
    a.resample(epoch=3, seed=7)
    b.resample(epoch=3, seed=7)  # another process: its own module, the same (seed, epoch, step)
    ids1, ids2 = torch.tensor([5, 9, 2]), torch.tensor([2, 77, 5, 9])
    out1, out2 = a("image", by_id(ids1), ids1), b("image", by_id(ids2), ids2)
    assert not torch.equal(out1, by_id(ids1))  # noised ...
    assert torch.equal(out1, out2[[2, 3, 0]])  # ... and entity 5, 9, 2 alike in both batches
    # with a real ratio: masks and eps follow the id, whatever the batch's composition or order
    c, d = make_keyed(noise_ratio=0.5, resample=resample), make_keyed(noise_ratio=0.5, resample=resample)
    c.resample(epoch=3, seed=7)
    d.resample(epoch=3, seed=7)
    ids = torch.arange(1000)
    full = c("image", by_id(ids), ids)
    part_ids = torch.cat([torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300], ids[:5]])
    part = d("image", by_id(part_ids), part_ids)  # a repeated entity gets the same noise twice
    assert torch.equal(part, full[part_ids])
    assert torch.equal(d.last_mask("image"), c.last_mask("image")[part_ids])
    assert torch.equal(d.mask_of("image", part_ids), d.last_mask("image"))


def test_keyed_draws_differ_across_epochs_seeds_and_modalities():
    ids = torch.arange(10_000)

    def draw(epoch, seed, name="image", noise_ratio=0.5):
        noise = make_keyed(noise_ratio=noise_ratio, mask_ratio=1.0)
        noise.set_stats("relation", *noise.stats("image"))  # same stats: only the draws can differ
        noise.resample(epoch=epoch, seed=seed)
        return noise.mask_of(name, ids), noise(name, torch.zeros(len(ids), D), ids)

    mask, out = draw(4, 9)
    for other in (draw(5, 9), draw(4, 10), draw(4, 9, "relation")):
        assert not torch.equal(other[0], mask)
        both = (other[0] & mask).float().mean().item()
        assert within(both, 0.25, len(ids))  # independent draws
    eps = draw(4, 9, noise_ratio=1.0)[1]
    for other in (draw(5, 9, noise_ratio=1.0), draw(4, 10, noise_ratio=1.0), draw(4, 9, "relation", 1.0)):
        assert torch.isclose(other[1], eps).float().mean() < 0.01  # other eps (nearly) everywhere
    again = draw(4, 9)
    assert torch.equal(again[0], mask) and torch.equal(again[1], out)  # and the same key replays exactly


def test_keyed_noised_share_and_eps_statistics():
    noise = make_keyed(noise_ratio=0.2, mask_ratio=1.0, structure_scale=0.5)
    noise.resample(epoch=0, seed=1)
    ids = torch.arange(200_000)
    assert abs(noise.mask_of("image", ids).float().mean().item() - 0.2) < 0.01
    assert abs(noise.mask_of("structure", ids).float().mean().item() - 0.1) < 0.01
    big = torch.arange(10**12, 10**12 + 200_000)  # ids far beyond any table size
    assert abs(noise.mask_of("image", big).float().mean().item() - 0.2) < 0.01
    x = torch.full((40_000, D), 3.0)
    out = noise("image", x, ids[:40_000])
    mask = noise.last_mask("image")
    assert torch.equal(mask, noise.mask_of("image", ids[:40_000]))
    assert torch.equal(out[~mask], x[~mask])  # untouched rows are exact
    eps = out[mask]  # mask_ratio 1: the noised rows are eps itself
    k = eps.shape[0]
    mean, std = stats()["image"]
    assert torch.all((eps.mean(0) - mean).abs() < 4 * std / math.sqrt(k))
    assert torch.all((eps.std(0) / std - 1).abs() < 5 / math.sqrt(2 * k))


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_keyed_off_in_eval_and_when_disabled(resample):
    x, ids = torch.randn(100, D), torch.arange(100)
    noise = make_keyed(noise_ratio=1.0, resample=resample)
    noise.eval()
    out = noise("image", x, ids)
    assert out is x and not noise.last_mask("image").any()
    off = make_keyed(enabled=False, noise_ratio=1.0, resample=resample)
    out = off("image", x, ids)
    assert out is x and torch.equal(out, x)


def test_keyed_step_mode_draws_anew_each_call_and_replays():
    a, b = make_keyed(resample="step", noise_ratio=0.5), make_keyed(resample="step", noise_ratio=0.5)
    ids = torch.arange(1000)
    x = by_id(ids)
    for n in (a, b):
        n.resample(epoch=0, seed=1)
    first = a("image", x, ids)
    mask1 = a.mask_of("image", ids)  # the last call's
    second = a("image", x, ids)
    assert not torch.equal(first, second) and not torch.equal(a.mask_of("image", ids), mask1)
    assert torch.equal(b("image", x, ids), first) and torch.equal(b("image", x, ids), second)
    a.resample(epoch=0, seed=1)
    with pytest.raises(KeyError, match="image"):
        a.mask_of("image", ids)
    assert torch.equal(a("image", x, ids), first)
    a("relation", x, ids)  # one step counter over all modalities, as in table mode
    assert not torch.equal(a("image", x, ids), second)


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_keyed_keeps_nothing_n_sized(resample):
    noise = make_keyed(resample=resample, noise_ratio=0.5)
    noise.resample(epoch=0, seed=3, struct_weight=torch.randn(500, D))
    ids = torch.arange(10**9, 10**9 + 64)  # works without num_entities, for ids of any size
    for name in ("image", "relation", "structure"):
        noise(name, torch.randn(64, D), ids)
        assert noise.last_mask(name).any()
    assert noise._drawn == {}
    with pytest.raises(ConfigError, match="mask_of"):
        noise.entity_mask("image")


def test_keyed_gradient_passes_through_the_clean_share():
    noise = make_keyed(noise_ratio=0.5, mask_ratio=0.7)
    noise.resample(epoch=0, seed=0)
    x = torch.randn(200, D, requires_grad=True)
    noise("image", x, torch.arange(200)).sum().backward()
    mask = noise.last_mask("image")
    assert mask.any() and not mask.all()
    assert torch.allclose(x.grad[mask], torch.full_like(x.grad[mask], 0.3))
    assert torch.equal(x.grad[~mask], torch.ones_like(x.grad[~mask]))


def test_keyed_state_dict_round_trip():
    a = make_keyed(resample="step", noise_ratio=0.5)
    a.resample(epoch=2, seed=5, struct_weight=torch.randn(300, D) + 1)
    x, ids = torch.randn(300, D), torch.arange(300)
    a("structure", x, ids)
    state = st_load(safetensors.torch.save(a.state_dict()))
    want = {name: a(name, x, ids) for name in ("structure", "image")}
    b = make_keyed(resample="step", noise_ratio=0.5)
    b.load_state_dict(state)
    for name in ("structure", "image"):
        assert torch.equal(b(name, x, ids), want[name])


@pytest.mark.parametrize("keyed", [False, True])
def test_set_stats_changes_the_draw(keyed):
    noise = make_keyed(noise_ratio=0.5) if keyed else make_noise(noise_ratio=0.5)
    noise.resample(epoch=0, seed=2)
    ids = torch.arange(2000)
    x = by_id(ids)
    before = noise("image", x, ids)
    mask = noise.last_mask("image")
    mean, std = torch.full((D,), 10.0), torch.full((D,), 0.1)
    noise.set_stats("image", mean, std)
    assert torch.equal(noise.stats("image")[0], mean) and torch.equal(noise.stats("image")[1], std)
    after = noise("image", x, ids)
    assert torch.equal(noise.last_mask("image"), mask)  # the same entities, drawn from the new stats
    assert not torch.isclose(after[mask], before[mask]).any()
    assert torch.equal(after[~mask], x[~mask])
    assert torch.all((after[mask] - 0.3 * x[mask] - 7.0).abs() < 0.7 * 0.1 * 7)  # eps ~ N(10, 0.1)
    with pytest.raises(DataError, match="shapes"):
        noise.set_stats("image", torch.zeros(D + 1), torch.ones(D + 1))


def test_mask_of_in_table_mode():
    noise = make_noise(noise_ratio=0.5)
    noise.resample(epoch=0, seed=2)
    ids = torch.tensor([7, 3, 7, 19_999])
    assert torch.equal(noise.mask_of("image", ids), noise.entity_mask("image")[ids])
    step = make_noise(resample="step", noise_ratio=0.5)
    step.resample(epoch=0, seed=2)
    with pytest.raises(KeyError, match="no step-mode noise call"):
        step.mask_of("image", ids)
    step("image", torch.zeros(len(ids), D), ids)
    assert torch.equal(step.mask_of("image", ids), step.last_mask("image"))


def test_table_step_draws_are_indexed_by_entity_id():
    """Step mode draws per entity too: a rank holding part of a batch, in any order, gets what one
    process holding all of it gets at the same step (the old per-row draw depended on the rows)."""
    one, rank = make_noise(resample="step", noise_ratio=0.5), make_noise(resample="step", noise_ratio=0.5)
    for n in (one, rank):
        n.resample(epoch=1, seed=3)
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:600]
    x = torch.randn(N, D)
    for _ in range(3):  # three steps: image, then relation, per step (one counter over both)
        full = {name: one(name, x[ids], ids) for name in ("image", "relation")}
        mine = ids[1::2].flip(0)  # this rank's share, in another order
        part = {name: rank(name, x[mine], mine) for name in ("image", "relation")}
        for name in ("image", "relation"):
            assert torch.equal(part[name], full[name][1::2].flip(0))
            assert torch.equal(rank.last_mask(name), rank.mask_of(name, mine))
    assert within(one.entity_mask("image").float().mean().item(), 0.5, N)  # the last step's draw over all N


# ---- keyed dropout (the fusion's dropout, keyed by entity id) ---------------------------------------
def test_keyed_keep_share_and_independence():
    keep = keyed_keep(11, torch.arange(4000), 301, 0.9)
    assert keep.shape == (4000, 301) and keep.dtype == torch.bool
    assert within(keep.float().mean().item(), 0.9, keep.numel())
    assert within(keep[:, 0].float().mean().item(), 0.9, 4000) and within(keep[:, 150].float().mean().item(), 0.9, 4000)
    both = (~keep[:, 3] & ~keep[:, 3 + 151]).float().mean().item()  # the two halves of one hash word
    assert within(both, 0.01, 4000)
    assert torch.equal(keyed_keep(11, torch.tensor([3999, 5]), 301, 0.9), keep[[3999, 5]])
    assert keyed_keep(11, torch.arange(10), 4, 1.0).all() and not keyed_keep(11, torch.arange(10), 4, 0.0).any()


def _fusion(keys: DropoutKeys, p: float = 0.5) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(p), torch.nn.Linear(6, 6))
    assert use_keyed_dropout(net, keys) == 1 and isinstance(net[1], KeyedDropout) and net[1].site == "1"
    return net.train()


def test_keyed_dropout_follows_the_entity_not_the_batch():
    keys_one, keys_rank = DropoutKeys(5), DropoutKeys(5)
    one, rank = _fusion(keys_one), _fusion(keys_rank)
    rank.load_state_dict(one.state_dict())
    ids = torch.tensor([40, 7, 13, 99, 2])
    x = torch.sin(ids[:, None].float() + torch.arange(6))
    for keys in (keys_one, keys_rank):
        keys.set_position(epoch=2, step=4)
    with keys_one.rows(ids):
        full = one(x)
    mine = torch.tensor([3, 1])
    with keys_rank.rows(ids[mine]):
        part = rank(x[mine])
    assert torch.equal(part, full[mine])
    drop = KeyedDropout(0.5, "s", keys_one).train()
    with keys_one.rows(ids):
        a, b = drop(torch.ones(5, 64)), drop(torch.ones(5, 64))  # a site called twice: two masks
    assert set(a.unique().tolist()) <= {0.0, 2.0} and not torch.equal(a, b)
    keys_one.set_position(epoch=2, step=5)
    with keys_one.rows(ids):
        assert not torch.equal(drop(torch.ones(5, 64)), a)  # a new step, a new mask
    keys_one.set_position(epoch=2, step=4)
    with keys_one.rows(ids):
        assert torch.equal(drop(torch.ones(5, 64)), a)  # replays (a resume needs nothing saved)
        assert torch.equal(drop.eval()(torch.ones(5, 64)), torch.ones(5, 64))  # off in eval


def test_keyed_dropout_falls_back_without_rows_or_position():
    keys = DropoutKeys(0)
    drop = KeyedDropout(0.5, "s", keys).train()
    x = torch.ones(8, 32)
    torch.manual_seed(0)
    plain = drop(x)  # no rows named: torch's dropout
    torch.manual_seed(0)
    assert torch.equal(plain, torch.nn.functional.dropout(x, 0.5, training=True))
    with keys.rows(torch.arange(8)):  # rows but no training position (a task that sets none)
        torch.manual_seed(0)
        assert torch.equal(drop(x), plain)
    keys.set_position(0, 0)
    with keys.rows(torch.arange(3)):  # rows that are not the input's (a whole-graph call)
        torch.manual_seed(0)
        assert torch.equal(drop(x), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_draws_on_the_device_of_x():
    noise = make_keyed(noise_ratio=0.5).cuda()
    noise.resample(epoch=1, seed=4)
    ids = torch.arange(5000)
    x = by_id(ids)
    cpu = noise("image", x, ids)
    cpu_mask = noise.last_mask("image")
    gpu = noise("image", x.cuda(), ids)  # ids on the CPU, x on the GPU: drawn on the GPU
    assert gpu.device.type == "cuda" and noise.last_mask("image").device.type == "cuda"
    assert torch.equal(noise.last_mask("image").cpu(), cpu_mask)  # the integer part is exact
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_dropout_mask_is_the_same_on_the_device():
    ids = torch.arange(3000)
    assert torch.equal(keyed_keep(9, ids.cuda(), 77, 0.9).cpu(), keyed_keep(9, ids, 77, 0.9))  # decided on integers
    keys = DropoutKeys(1)
    keys.set_position(0, 3)
    drop = KeyedDropout(0.1, "s", keys).train()
    x = torch.randn(3000, 77)
    with keys.rows(ids):
        cpu = drop(x)
    with keys.rows(ids):
        gpu = drop(x.cuda())  # ids on the CPU, x on the GPU: drawn on the GPU
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu)
