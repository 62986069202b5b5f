"""Modality encoders: each turns one modality of E entities into an (E, H) token.

An encoder is split in two so that Gauss Modality Noise Masking can sit between the halves
and wrap any encoder (the paper's plug-in use):
    inputs(entity_ids, features) -> x (E, D)   the tensor GMNM noises
    forward(x, edge_index)        -> (E, H)    the encoding proper
Feature modalities (relation, attribute, image, name, ...): x is the entity's feature row,
encoded by Linear(D, H). Structure: x is the entity's learned embedding, encoded by the GAT over
the given edges (or used as is, `structure_encoder: embedding`).
E entities, D input features, H hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from snag_dist.config.schema import ModelConfig
from snag_dist.errors import DataError
from snag_dist.model.gat import GAT
from snag_dist.model.spec import STRUCTURE, ModelSpec
from snag_dist.registry import Registry

EncoderBuilder = Callable[[str, ModelConfig, ModelSpec], "ModalityEncoder"]
ENCODERS: Registry[EncoderBuilder] = Registry("encoder")


class ModalityEncoder(nn.Module):
    """The encoder protocol; `name` is the modality it encodes."""

    # True when outputs depend on neighbours (a GNN): it must see the whole given subgraph, and
    # outputs are selected afterwards; other encoders only run on the rows that are asked for.
    uses_graph: bool = False
    # True when a graph encoder can compute just the rows asked for (forward's out_index): then it
    # gets the output ids instead of being run on every row and selected afterwards.
    selects_outputs: bool = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def inputs(self, entity_ids: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The (E, D) input of this modality for the given entities (what GMNM noises)."""
        raise NotImplementedError

    def forward(self, x_ED: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class LinearEncoder(ModalityEncoder):
    """A dense feature modality: Linear(D, H), as in the reference (rel_fc, att_fc, img_fc, ...)."""

    def __init__(self, name: str, dim: int, hidden: int) -> None:
        super().__init__(name)
        self.dim = dim
        self.proj = nn.Linear(dim, hidden)

    def inputs(self, entity_ids: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.name not in features:
            raise DataError(f"no '{self.name}' features in the batch (have: {', '.join(features) or 'none'})")
        x_ED = features[self.name]
        if x_ED.dim() != 2 or x_ED.shape != (entity_ids.shape[0], self.dim):
            raise DataError(
                f"'{self.name}' features have shape {tuple(x_ED.shape)}, want ({entity_ids.shape[0]}, {self.dim})"
            )
        # Stores may hold fp16 or ints (bag-of-relations counts); the layer decides the dtype.
        return x_ED.to(dtype=self.proj.weight.dtype)

    def forward(self, x_ED: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x_ED)


class StructureEncoder(ModalityEncoder):
    """Learned entity embedding, optionally followed by the diagonal GAT over the given edges."""

    def __init__(self, num_entities: int, hidden: int, gat: GAT | None = None, own_table: bool = True) -> None:
        super().__init__(STRUCTURE)
        # Without its own table (stream path) the rows come in as features["structure"], fetched
        # from a row-sharded table outside the module (model/sharded_table.py).
        self.embedding = nn.Embedding(num_entities, hidden) if own_table else None
        if self.embedding is not None:
            # Reference init: N(0, 1/sqrt(num_entities)), small so the GAT starts near averaging.
            nn.init.normal_(self.embedding.weight, std=init_std(num_entities))
        self.gat = gat
        self.uses_graph = self.selects_outputs = gat is not None

    def inputs(self, entity_ids: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if STRUCTURE in features:
            return features[STRUCTURE]
        if self.embedding is None:
            raise DataError("the structure encoder has no table of its own: pass features['structure'] rows")
        return self.embedding(entity_ids)

    def forward_sampled(self, x_SH: torch.Tensor, sampled, out_ids: torch.Tensor) -> torch.Tensor:
        """(O, H) for ``out_ids``; x_SH are the rows of ``sampled.nodes`` (a fan-out-sampled subgraph)."""
        if self.gat is None:
            return x_SH
        h_TH = self.gat.forward_sampled(x_SH, sampled)
        return h_TH[torch.searchsorted(sampled.targets.to(out_ids.device), out_ids)]

    def forward(self, x_EH: torch.Tensor, edge_index: torch.Tensor | None = None,
                out_index: torch.Tensor | None = None) -> torch.Tensor:
        """(E, H), or (O, H) for the rows ``out_index`` (the GAT then runs on their receptive field)."""
        if self.gat is None:
            return x_EH if out_index is None else x_EH[out_index]
        if edge_index is None:
            raise DataError("the GAT structure encoder needs edge_index (2, num_edges) in local ids")
        return self.gat(x_EH, edge_index, out_index=out_index)


def init_std(num_entities: int) -> float:
    """The structure table's initial std (the reference's N(0, 1/sqrt(num_entities)))."""
    return 1.0 / math.sqrt(num_entities)


@ENCODERS.register("gat")
def build_gat_encoder(name: str, cfg: ModelConfig, spec: ModelSpec, own_table: bool = True) -> ModalityEncoder:
    gat = GAT(cfg.hidden, cfg.gat_layers, cfg.gat_heads, cfg.gat_dropout) if cfg.gat_layers else None
    return StructureEncoder(spec.num_entities, cfg.hidden, gat, own_table)


@ENCODERS.register("embedding")
def build_embedding_encoder(name: str, cfg: ModelConfig, spec: ModelSpec, own_table: bool = True
                            ) -> ModalityEncoder:
    return StructureEncoder(spec.num_entities, cfg.hidden, gat=None, own_table=own_table)


@ENCODERS.register("linear")
def build_linear_encoder(name: str, cfg: ModelConfig, spec: ModelSpec) -> ModalityEncoder:
    return LinearEncoder(name, spec.get(name).dim, cfg.hidden)


def build_encoders(cfg: ModelConfig, spec: ModelSpec, modalities: Sequence[str], own_table: bool = True
                   ) -> nn.ModuleDict:
    """One encoder per modality, in token order: cfg.structure_encoder for structure, linear otherwise
    (``own_table=False``: the structure rows come from outside, see StructureEncoder)."""
    encoders = nn.ModuleDict()
    for name in modalities:
        if name == STRUCTURE:
            encoders[name] = ENCODERS.get(cfg.structure_encoder)(name, cfg, spec, own_table=own_table)
        else:
            encoders[name] = ENCODERS.get("linear")(name, cfg, spec)
    return encoders
