"""SNAG assembly: contract of SnagOutput, modality selection, presence, noise, gradients, state."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load  # bytes -> tensors, no pickle

from snag_dist.config.schema import ModalityNoise, NoiseConfig
from snag_dist.errors import ConfigError, DataError
from snag_dist.model import ENCODERS, SNAG, build_snag
from tests.model.model_helpers import make_cfg, make_spec, make_toy


def run(model, toy, present=True):
    return model(toy.entity_ids, toy.features, toy.present if present else None, toy.edge_index)


def test_output_contract():
    toy = make_toy()
    torch.manual_seed(0)
    model = build_snag(make_cfg(), NoiseConfig(), toy.spec).eval()
    out = run(model, toy)
    e, m, h = 40, 4, 16
    assert out.modalities == ["structure", "relation", "attribute", "image"]
    assert set(out.modality_emb) == set(out.hidden) == set(out.modalities)
    assert all(t.shape == (e, h) for t in [*out.modality_emb.values(), *out.hidden.values()])
    assert out.hidden_stack.shape == (e, m, h) and torch.equal(out.hidden["image"], out.hidden_stack[:, 3])
    assert out.modality_weights.shape == (e, m) and out.global_weights.shape == (m,)
    assert torch.allclose(out.modality_weights.sum(-1), torch.ones(e))
    assert torch.allclose(out.global_weights.sum(), torch.tensor(1.0))
    assert out.joint.shape == out.joint_global.shape == (e, m * h)
    assert out.present.dtype == torch.bool and out.present[:, 0].all()
    block = out.joint.view(e, m, h)[:, 1]
    want = F.normalize(out.modality_emb["relation"]) * out.modality_weights[:, 1:2]
    assert torch.allclose(block, want, atol=1e-6)
    all_present = run(model, toy, present=False)
    glob = all_present.joint_global.view(e, m, h)[:, 2]
    assert torch.allclose(glob, F.normalize(all_present.modality_emb["attribute"]) * out.global_weights[2], atol=1e-6)


def test_absent_modality_gets_zero_weight_and_zero_blocks():
    toy = make_toy()
    model = build_snag(make_cfg(), NoiseConfig(), toy.spec).eval()
    out = run(model, toy)
    missing = ~toy.present[:, toy.spec.names.index("image")]
    i = out.modalities.index("image")
    assert missing.any() and torch.equal(out.present[:, i], ~missing)
    assert torch.all(out.modality_weights[missing, i] == 0)
    for joint in (out.joint, out.joint_global):
        assert torch.all(joint.view(40, 4, 16)[missing, i] == 0)
    assert torch.allclose(out.joint_global.view(40, 4, 16).norm(dim=-1).sum(-1)[missing], torch.ones(int(missing.sum())))


def test_dropping_modalities_via_config():
    toy = make_toy()
    model = build_snag(make_cfg(modalities=["image", "structure", "name"]), NoiseConfig(), toy.spec)
    assert model.modalities == ["structure", "image"]  # 'name' is not in the data: skipped
    out = run(model, toy)
    assert out.joint.shape == (40, 2 * 16)
    feats_only = build_snag(make_cfg(modalities=["attribute", "relation"]), NoiseConfig(), toy.spec)
    assert feats_only.modalities == ["relation", "attribute"]  # spec order
    assert run(feats_only, toy).modality_weights.shape == (40, 2)
    with pytest.raises(ConfigError, match="no modality left"):
        build_snag(make_cfg(modalities=["name"]), NoiseConfig(), toy.spec)


@pytest.mark.parametrize("kind", ["gat", "embedding"])
def test_structure_encoders(kind):
    toy = make_toy()
    model = build_snag(make_cfg(structure_encoder=kind, modalities=["structure"]), None, toy.spec)
    out = model(toy.entity_ids, {}, None, toy.edge_index if kind == "gat" else None)
    assert out.joint.shape == (40, 16)
    if kind == "gat":
        with pytest.raises(DataError, match="edge_index"):
            model(toy.entity_ids, {}, None, None)


def test_every_registered_encoder_is_built_and_run():
    toy = make_toy()
    cfg = make_cfg()
    for name in ENCODERS.names():
        modality = "relation" if name == "linear" else "structure"
        enc = ENCODERS.get(name)(modality, cfg, toy.spec)
        x = enc.inputs(toy.entity_ids, toy.features)
        assert enc(x, toy.edge_index).shape == (40, 16)
    with pytest.raises(ConfigError, match="unknown encoder"):
        ENCODERS.get("mlp")


def test_batch_errors():
    toy = make_toy()
    model = build_snag(make_cfg(), NoiseConfig(), toy.spec)
    with pytest.raises(DataError, match="no 'image' features"):
        model(toy.entity_ids, {k: v for k, v in toy.features.items() if k != "image"}, None, toy.edge_index)
    with pytest.raises(DataError, match="spec order"):
        model(toy.entity_ids, toy.features, toy.present[:, :2], toy.edge_index)


def test_noise_applies_in_training_only():
    toy = make_toy()
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_snag(cfg, NoiseConfig(noise_ratio=1.0, mask_ratio=1.0, structure_scale=1.0), toy.spec)
    torch.manual_seed(0)
    clean = build_snag(cfg, None, toy.spec)
    model.resample_noise(epoch=0, seed=0)
    model.eval(), clean.eval()
    assert torch.equal(run(model, toy).joint, run(clean, toy).joint)
    model.train()
    noisy = run(model, toy)
    assert model.noise.last_mask("image").all()
    assert not torch.allclose(noisy.modality_emb["image"], run(clean, toy).modality_emb["image"])


def test_resample_noise_takes_structure_stats_from_the_embedding():
    toy = make_toy()
    model = build_snag(make_cfg(), NoiseConfig(), toy.spec)
    with torch.no_grad():
        model.structure_weight().add_(3.0)
    model.resample_noise(epoch=1, seed=2)
    mean, _ = model.noise.stats("structure")
    assert torch.allclose(mean, model.structure_weight().mean(0))


def test_gradients_flow_to_all_parameters():
    toy = make_toy()
    torch.manual_seed(0)
    model = build_snag(make_cfg(fusion_layers=2), NoiseConfig(), toy.spec).train()
    model.resample_noise(epoch=0, seed=0)
    out = run(model, toy)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (out.joint, out.joint_global, out.hidden_stack))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_subgraph_of_entities():
    toy = make_toy()
    model = build_snag(make_cfg(), NoiseConfig(), toy.spec).eval()
    ids = torch.tensor([5, 9, 17, 30])
    local_edges = torch.tensor([[0, 1, 2], [1, 2, 3]])
    feats = {k: v[ids] for k, v in toy.features.items()}
    out = model(ids, feats, toy.present[ids], local_edges)
    assert out.joint.shape == (4, 64)


def test_noise_overrides_may_name_configured_modalities_the_data_lacks():
    over = {"name": ModalityNoise(noise_ratio=0.1)}  # 'name' is configured but not in this data
    assert build_snag(make_cfg(), NoiseConfig(per_modality=over), make_spec()).modalities[0] == "structure"
    with pytest.raises(ConfigError, match="unknown modality"):
        build_snag(make_cfg(), NoiseConfig(per_modality={"nmae": ModalityNoise()}), make_spec())


def test_specs_compare_by_value():
    assert make_spec() == make_spec() and make_spec() != make_spec(with_stats=False)


def test_no_weight_decay_names():
    model = build_snag(make_cfg(fusion="concat"), None, make_spec())
    names = model.no_weight_decay()
    assert {"global_weights", "fusion.global_weights", "encoders.image.proj.bias"} <= names
    assert "encoders.image.proj.weight" not in names


def test_state_dict_round_trip_through_safetensors():
    toy = make_toy()
    torch.manual_seed(0)
    a = build_snag(make_cfg(), NoiseConfig(resample="step"), toy.spec)
    a.resample_noise(epoch=3, seed=4)
    run(a, toy)
    blob = safetensors.torch.save(a.state_dict())
    want = run(a, toy).joint
    torch.manual_seed(1)
    b = build_snag(make_cfg(), NoiseConfig(resample="step"), toy.spec)
    b.load_state_dict(st_load(blob))
    assert isinstance(b, SNAG) and torch.equal(run(b, toy).joint, want)
