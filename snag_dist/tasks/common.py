"""What every task reads from a shard directory: the model spec (dims + GMNM stats) and the graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from snag_dist.data.manifest import STATS, Manifest, load_manifest
from snag_dist.data.store import FeatureStore
from snag_dist.data.stream import read_all_rows
from snag_dist.model.spec import ModalitySpec, ModelSpec


def model_spec(root: Path, manifest: Manifest) -> ModelSpec:
    """Feature modalities with their per-dimension mean/std (what GMNM draws noise from)."""
    stats = load_file(str(root / STATS))
    mods = tuple(
        ModalitySpec(name, info.dim, torch.from_numpy(stats[f"{name}.mean"]), torch.from_numpy(stats[f"{name}.std"]))
        for name, info in manifest.modalities.items()
    )
    return ModelSpec(manifest.num_entities, mods)


@dataclass
class GraphData:
    """Whole-graph inputs of a small/medium MMKG held on the training device.

    ids (N,), features {m: (N, D)}, present (N, M_spec) bool, edge_index (2, T) head -> tail.
    """

    ids: torch.Tensor
    features: dict[str, torch.Tensor]
    present: torch.Tensor
    edge_index: torch.Tensor
    kg: torch.Tensor

    def to(self, device: torch.device) -> GraphData:
        return GraphData(self.ids.to(device), {k: v.to(device) for k, v in self.features.items()},
                         self.present.to(device), self.edge_index.to(device), self.kg.to(device))


def load_graph(root: Path, store_dir: str = "") -> tuple[Manifest, ModelSpec, GraphData]:
    manifest = load_manifest(root)
    store = FeatureStore.open(root, store_dir or None)
    table = store.all()
    triples = read_all_rows(root, "triples/train")
    edge_index = torch.from_numpy(np.ascontiguousarray(triples[:, [0, 2]].T))
    graph = GraphData(torch.arange(manifest.num_entities), table["features"], table["mask"], edge_index,
                      table["kg"])
    return manifest, model_spec(root, manifest), graph
