"""Small specs, configs and batches for the model tests (CPU, milliseconds).

A uniquely named helper module rather than conftest.py: plain functions import cleanly
(`from model_helpers import ...`) without clashing with other test folders' conftests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snag_dist.config.schema import ModelConfig
from snag_dist.model import ModalitySpec, ModelSpec

DIMS = {"relation": 12, "attribute": 10, "image": 16}


def make_spec(num_entities: int = 40, dims: dict[str, int] = DIMS, with_stats: bool = True) -> ModelSpec:
    gen = torch.Generator().manual_seed(0)
    mods = []
    for name, d in dims.items():
        mean = torch.randn(d, generator=gen) if with_stats else None
        std = torch.rand(d, generator=gen) + 0.5 if with_stats else None
        mods.append(ModalitySpec(name, d, mean, std))
    return ModelSpec(num_entities, tuple(mods))


def make_cfg(**overrides) -> ModelConfig:
    base = dict(hidden=16, intermediate=24, fusion_heads=2, gat_heads=2, dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def random_edges(num_nodes: int, num_edges: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_nodes, (2, num_edges), generator=gen)


@dataclass
class Toy:
    spec: ModelSpec
    entity_ids: torch.Tensor  # (E,)
    features: dict[str, torch.Tensor]  # name -> (E, D)
    present: torch.Tensor  # (E, M_spec) spec order
    edge_index: torch.Tensor  # (2, num_edges) local ids


def make_toy(num_entities: int = 40, seed: int = 0) -> Toy:
    spec = make_spec(num_entities)
    gen = torch.Generator().manual_seed(seed)
    feats = {m.name: torch.randn(num_entities, m.dim, generator=gen) for m in spec.modalities}
    present = torch.ones(num_entities, len(spec.modalities), dtype=torch.bool)
    present[::3, spec.names.index("image")] = False  # a third of the entities have no image
    return Toy(spec, torch.arange(num_entities), feats, present, random_edges(num_entities, 3 * num_entities, seed))

