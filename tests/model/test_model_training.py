"""SNAG and the plug-in (GMNM + concat fusion around other encoders) learn a toy alignment task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config.schema import NoiseConfig
from snag_dist.model import (
    ConcatFusion,
    GaussModalityNoise,
    ModalityEncoder,
    ModalitySpec,
    ModelSpec,
    MultiModalModel,
    StructureEncoder,
    build_snag,
)
from tests.model.model_helpers import make_cfg, random_edges

P = 48  # aligned pairs; entity p (left KG) matches p + P (right KG)
DIMS = {"relation": 20, "image": 12}


def toy_alignment(seed: int = 0):
    """Two KGs sharing latent entities: noisy views of the same latent and mirrored edges."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(P, 6, generator=gen)
    feats = {}
    for name, d in DIMS.items():
        proj = torch.randn(6, d, generator=gen)
        feats[name] = torch.cat([z @ proj, z @ proj]) + 0.5 * torch.randn(2 * P, d, generator=gen)
    spec = ModelSpec(2 * P, tuple(ModalitySpec(n, d, feats[n].mean(0), feats[n].std(0)) for n, d in DIMS.items()))
    present = torch.ones(2 * P, len(DIMS), dtype=torch.bool)
    present[::3, 1] = False  # some entities lack an image
    half = random_edges(P, 3 * P, seed)
    edges = torch.cat([half, half + P], dim=1)
    return spec, torch.arange(2 * P), feats, present, edges


def info_nce(emb: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    a, b = F.normalize(emb[:P]), F.normalize(emb[P:])
    logits = a @ b.T / tau
    labels = torch.arange(P)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train(model: MultiModalModel, batch, steps: int = 40) -> tuple[float, float]:
    """(clean loss before, clean loss after) of Adam on the GMI-style objective, noise on."""
    ids, feats, present, edges = batch

    def clean_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = model(ids, feats, present, edges)
        model.train()
        return float(info_nce(out.joint_global))

    before = clean_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        if step % 10 == 0:
            model.resample_noise(epoch=step // 10, seed=0)
        out = model(ids, feats, present, edges)
        loss = info_nce(out.joint) + info_nce(out.joint_global)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, clean_loss()


@pytest.mark.parametrize("fusion", ["transformer", "concat"])
def test_snag_learns(fusion):
    spec, *batch = toy_alignment()
    torch.manual_seed(0)
    model = build_snag(make_cfg(hidden=32, fusion=fusion), NoiseConfig(noise_ratio=0.3), spec)
    before, after = train(model, batch)
    assert after < 0.5 * before, (before, after)


class MLPEncoder(ModalityEncoder):
    """A stand-in for another model's feature encoder (not one of ours)."""

    def __init__(self, name: str, dim: int, hidden: int) -> None:
        super().__init__(name)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def inputs(self, entity_ids, features):
        return features[self.name]

    def forward(self, x, edge_index=None):
        return self.net(x)


def test_plug_in_gmnm_and_concat_fusion_around_other_encoders_learn():
    spec, ids, feats, _, edges = toy_alignment()
    hidden = 32
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"structure": StructureEncoder(spec.num_entities, hidden)})
    encoders.update({m.name: MLPEncoder(m.name, m.dim, hidden) for m in spec.modalities})
    stats = {m.name: (m.mean, m.std) for m in spec.modalities}
    stats["structure"] = (torch.zeros(hidden), torch.ones(hidden))
    noise = GaussModalityNoise(NoiseConfig(noise_ratio=0.3), stats, num_entities=spec.num_entities)
    model = MultiModalModel(encoders, ConcatFusion(make_cfg(hidden=hidden), len(encoders)), noise)
    before, after = train(model, (ids, feats, None, edges))
    assert after < 0.5 * before, (before, after)
    model(ids, feats, None, edges)  # train() leaves the model in training mode, noise on
    assert model.noise.last_mask("relation").any()
