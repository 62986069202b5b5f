"""SNAG assembly: encoders -> GMNM -> fusion -> joint embeddings.

`MultiModalModel` is the plug-in of the paper: Gauss Modality Noise Masking and a fusion wrapped
around ANY dict of modality encoders (each `inputs` -> noise -> `forward`). With the Transformer
fusion it is SNAG/MEAformer; with the concat fusion an EVA/MCLEA-style model. `SNAG` builds the
encoders and the fusion from a `ModelConfig` and a `ModelSpec`.

Joint embeddings (the reference's joint_emb / joint_emb_fz): the concatenation of L2-normalised
modality embeddings, each times its per-entity weight (from the fusion) or its global weight
(softmax of a learned M-vector; the test embedding).
E entities, M modality tokens, H hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config.schema import ModelConfig, NoiseConfig
from snag_dist.errors import ConfigError, DataError
from snag_dist.model.encoders import build_encoders
from snag_dist.model.fusion import build_fusion, masked_softmax
from snag_dist.model.noise import GaussModalityNoise, check_overrides
from snag_dist.model.spec import STRUCTURE, ModelSpec


@dataclass
class SnagOutput:
    modalities: list[str]  # token order, M
    modality_emb: dict[str, torch.Tensor]  # (E, H) encoder outputs per modality (ECIA)
    hidden: dict[str, torch.Tensor]  # (E, H) fusion outputs per modality, not normalised (IIR)
    hidden_stack: torch.Tensor  # (E, M, H)
    modality_weights: torch.Tensor  # (E, M) per-entity weights from the fusion
    global_weights: torch.Tensor  # (M,) softmax of the learned global weights
    global_entity_weights: torch.Tensor  # (E, M) the global weights renormalised over present modalities
    present: torch.Tensor  # (E, M) bool

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SnagOutput:
        """``fn`` applied to every per-entity field (the global weights are shared; the joint embeddings
        are derived again from the mapped fields on use)."""
        return dataclasses.replace(
            self, modality_emb={k: fn(v) for k, v in self.modality_emb.items()},
            hidden={k: fn(v) for k, v in self.hidden.items()}, hidden_stack=fn(self.hidden_stack),
            modality_weights=fn(self.modality_weights), global_entity_weights=fn(self.global_entity_weights),
            present=fn(self.present))

    def head(self, n: int) -> SnagOutput:
        """The first ``n`` rows."""
        return self.map_rows(lambda t: t[:n])

    # The joint embeddings are derived on first use: completion never reads them, and computing them
    # eagerly cost three (E, M, H) passes per step (~10 % of a fused MKG-W step on one core).
    @cached_property
    def _normed(self) -> torch.Tensor:  # (E, M, H) L2-normalised modality_emb in token order
        return F.normalize(torch.stack([self.modality_emb[n] for n in self.modalities], dim=1), dim=-1)

    @cached_property
    def joint(self) -> torch.Tensor:
        """(E, M*H) normalised modality_emb, each times its per-entity weight."""
        return (self._normed * self.modality_weights[..., None]).reshape(self.present.shape[0], -1)

    @cached_property
    def joint_global(self) -> torch.Tensor:
        """(E, M*H) the same with the global weights (the test embedding)."""
        return (self._normed * self.global_entity_weights[..., None]).reshape(self.present.shape[0], -1)


class MultiModalModel(nn.Module):
    """GMNM + fusion around a dict of modality encoders (see `encoders.ModalityEncoder`)."""

    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module, noise: GaussModalityNoise | None = None) -> None:
        super().__init__()
        if len(encoders) == 0:
            raise ConfigError("a multi-modal model needs at least one modality encoder")
        self.encoders = encoders
        self.fusion = fusion
        self.noise = noise
        self.modalities: list[str] = list(encoders.keys())
        # Reference init: ones, i.e. equal weights. Named so it is exempt from weight decay.
        self.global_weights = nn.Parameter(torch.ones(len(self.modalities)))

    def structure_weight(self) -> torch.Tensor | None:
        """(N, H) learned structure embedding, if the model has one (GMNM takes its stats)."""
        enc = self.encoders[STRUCTURE] if STRUCTURE in self.encoders else None
        embedding = getattr(enc, "embedding", None)
        return embedding.weight if isinstance(embedding, nn.Embedding) else None

    def resample_noise(self, epoch: int, seed: int) -> None:
        """New GMNM draws for an epoch; structure stats from the current embedding."""
        if self.noise is None:
            return
        weight = self.structure_weight() if STRUCTURE in self.noise.names else None
        self.noise.resample(epoch, seed, weight)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser should not decay: biases and the global modality weights."""
        return {n for n, _ in self.named_parameters() if n.endswith("bias") or n.endswith("global_weights")}

    def encode_modalities(
        self, entity_ids: torch.Tensor, features: Mapping[str, torch.Tensor], edge_index: torch.Tensor | None,
        out_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(O, H) per modality: encoder inputs, GMNM (training only), encoder.

        ``out_index`` (O,) selects the rows wanted as outputs (default: all E). Graph encoders see
        all E given entities (their neighbourhood) and, if they can (`selects_outputs`), compute
        only the O rows' receptive field; the others run only over the O rows — a training step
        over a 3,500-pair batch then projects/fuses 7,000 entities, not the graph.
        """
        emb: dict[str, torch.Tensor] = {}
        out_ids = entity_ids if out_index is None else entity_ids[out_index]
        for name, encoder in self.encoders.items():
            x_ED = encoder.inputs(entity_ids, features)
            whole = encoder.uses_graph or out_index is None
            if not whole:
                x_ED = x_ED[out_index]
            if self.noise is not None:
                x_ED = self.noise(name, x_ED, entity_ids if whole else out_ids)
            if whole and out_index is not None and encoder.selects_outputs:
                emb[name] = encoder(x_ED, edge_index, out_index=out_index)
                continue
            h = encoder(x_ED, edge_index)
            emb[name] = h[out_index] if (out_index is not None and whole) else h
        sizes = {tuple(t.shape) for t in emb.values()}
        if len(sizes) != 1:
            raise ConfigError(f"modality encoders disagree on the token shape: {sizes}")
        return emb

    def forward(
        self,
        entity_ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        present: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
    ) -> SnagOutput:
        """entity_ids (E,); features name -> (E, D); present (E, M) bool in token order (None: all).

        With ``out_index`` (O,), outputs are for entity_ids[out_index] only (see encode_modalities).
        """
        num = entity_ids.shape[0] if out_index is None else out_index.shape[0]
        m = len(self.modalities)
        if present is not None and out_index is not None:
            present = present[out_index]
        if present is None:
            present = torch.ones(num, m, dtype=torch.bool, device=entity_ids.device)
        if tuple(present.shape) != (num, m):
            raise DataError(f"present has shape {tuple(present.shape)}, want ({num}, {m}) in order {self.modalities}")
        emb = self.encode_modalities(entity_ids, features, edge_index, out_index)
        return self.fuse(emb, present)

    def forward_rows(self, out_ids: torch.Tensor, features: Mapping[str, torch.Tensor],
                     present: torch.Tensor | None = None, sampled=None) -> SnagOutput:
        """The stream path: outputs for ``out_ids`` (O,) only, every input given per row.

        ``features`` hold the O rows of each feature modality and, for the structure modality, its
        learned rows: of ``sampled.nodes`` when a graph encoder runs on a sampled subgraph
        (``model.sampling.SampledGraph``), else of ``out_ids``. GMNM noises each input by entity id.
        """
        emb: dict[str, torch.Tensor] = {}
        for name, encoder in self.encoders.items():
            graph = encoder.uses_graph and sampled is not None
            ids = sampled.nodes.to(out_ids.device) if graph else out_ids
            x = encoder.inputs(ids, features)
            if self.noise is not None:
                x = self.noise(name, x, ids)
            emb[name] = encoder.forward_sampled(x, sampled, out_ids) if graph else encoder(x, None)
        num = out_ids.shape[0]
        if present is None:
            present = torch.ones(num, len(self.modalities), dtype=torch.bool, device=out_ids.device)
        return self.fuse(emb, present)

    def fuse(self, emb: Mapping[str, torch.Tensor], present: torch.Tensor) -> SnagOutput:
        """Tokens (E, H) per modality + present (E, M) token order -> fusion and joint embeddings."""
        num = present.shape[0]
        present_EM = present.to(dtype=torch.bool)
        tokens_EMH = torch.stack([emb[n] for n in self.modalities], dim=1)
        fused = self.fusion(tokens_EMH, present_EM)
        global_M = F.softmax(self.global_weights, dim=0)
        # Per entity, absent modalities drop out of the test embedding too, the rest renormalise.
        global_EM = masked_softmax(self.global_weights.expand(num, -1), present_EM)
        return SnagOutput(
            modalities=list(self.modalities),
            modality_emb=emb,
            hidden={n: fused.hidden[:, i] for i, n in enumerate(self.modalities)},
            hidden_stack=fused.hidden,
            modality_weights=fused.modality_weights,
            global_weights=global_M,
            global_entity_weights=global_EM,
            present=present_EM,
        )


def select_modalities(cfg: ModelConfig, spec: ModelSpec) -> list[str]:
    """Token order: structure (if configured), then the configured feature modalities in spec order."""
    chosen = [STRUCTURE] if STRUCTURE in cfg.modalities else []
    chosen += [name for name in spec.names if name in cfg.modalities]
    if not chosen:
        raise ConfigError(
            f"no modality left: model.modalities={list(cfg.modalities)} and the data has "
            f"{[STRUCTURE, *spec.names]}"
        )
    return chosen


class SNAG(MultiModalModel):
    """SNAG: structure (embedding + GAT) and linear feature encoders, GMNM, Transformer fusion."""

    def __init__(self, cfg: ModelConfig, spec: ModelSpec, noise: GaussModalityNoise | None = None,
                 own_table: bool = True) -> None:
        modalities = select_modalities(cfg, spec)
        super().__init__(build_encoders(cfg, spec, modalities, own_table), build_fusion(cfg, len(modalities)), noise)
        self.cfg = cfg
        self.spec = spec
        self.spec_columns = [spec.names.index(n) for n in modalities if n != STRUCTURE]
        weight = self.structure_weight()
        if noise is not None and weight is not None and STRUCTURE in noise.names:
            noise.set_structure_stats(weight)  # so noise is sane even before the first resample

    def forward(
        self,
        entity_ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        present: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
    ) -> SnagOutput:
        """As MultiModalModel.forward, but `present` is (E, M_spec) bool in SPEC order (None: all)."""
        return super().forward(entity_ids, features, self.token_present(present, entity_ids), edge_index, out_index)

    def forward_rows(self, out_ids: torch.Tensor, features: Mapping[str, torch.Tensor],
                     present: torch.Tensor | None = None, sampled=None) -> SnagOutput:
        """As MultiModalModel.forward_rows, but `present` is (O, M_spec) bool in SPEC order (None: all)."""
        return super().forward_rows(out_ids, features, self.token_present(present, out_ids), sampled)

    def token_present(self, present_spec: torch.Tensor | None, entity_ids: torch.Tensor) -> torch.Tensor | None:
        """(E, M_spec) spec-order mask -> (E, M) token-order mask; structure is always present."""
        if present_spec is None:
            return None
        num, m_spec = entity_ids.shape[0], len(self.spec.modalities)
        if tuple(present_spec.shape) != (num, m_spec):
            raise DataError(f"present has shape {tuple(present_spec.shape)}, want ({num}, {m_spec}) in spec order")
        cols = present_spec.to(dtype=torch.bool)[:, self.spec_columns]
        if STRUCTURE in self.modalities:
            cols = torch.cat([torch.ones(num, 1, dtype=torch.bool, device=cols.device), cols], dim=1)
        return cols


def build_noise(
    noise_cfg: NoiseConfig, spec: ModelSpec, modalities: list[str], hidden: int, also_known: Iterable[str] = (),
    keyed: bool = False,
) -> GaussModalityNoise:
    """GMNM over the used modalities; structure stats start as a placeholder (set from the weights).

    Overrides may name any modality of the data or of `also_known` (the configured modalities, which
    a dataset may lack); anything else is a typo.
    """
    check_overrides(noise_cfg, [STRUCTURE, *spec.names, *also_known])
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    missing: list[str] = []
    for name in modalities:
        if name == STRUCTURE:
            stats[name] = (torch.zeros(hidden), torch.ones(hidden))
            continue
        ms = spec.get(name)
        if ms.mean is None or ms.std is None:
            missing.append(name)
        else:
            stats[name] = (ms.mean, ms.std)
    noise = GaussModalityNoise(noise_cfg, stats, num_entities=spec.num_entities, keyed=keyed)
    needed = [n for n in missing if noise_cfg.enabled and min(noise.ratios(n)) > 0.0]
    if needed:
        raise DataError(
            f"GMNM needs per-dimension mean/std for {needed} but the spec has none; "
            "set noise.enabled=false or noise.per_modality.<name>.noise_ratio=0"
        )
    return noise


def build_snag(model_cfg: ModelConfig, noise_cfg: NoiseConfig | None, spec: ModelSpec, stream: bool = False) -> SNAG:
    """SNAG from its configs and the data spec (noise_cfg None: no GMNM module at all).

    ``stream``: the structure rows live in a row-sharded table outside the module, and GMNM draws are
    keyed by entity id unless ``noise.draws`` says otherwise."""
    modalities = select_modalities(model_cfg, spec)
    noise = None
    if noise_cfg is not None:
        keyed = noise_cfg.draws == "keyed" or (noise_cfg.draws == "auto" and stream)
        noise = build_noise(noise_cfg, spec, modalities, model_cfg.hidden, also_known=model_cfg.modalities,
                            keyed=keyed)
    return SNAG(model_cfg, spec, noise, own_table=not stream)
