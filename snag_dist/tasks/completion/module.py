"""The trained module of KG completion: SNAG, the readout projection and RotatE, and its loss.

The entity vector is SNAG's fused output read out per `readout` ("graph": the structure token,
"mean": the mean of the present tokens), projected to 2*D reals (real and imaginary parts) by
`projection_layers` layers (``rotate.py`` scores them). With `entity_residual`, a free per-entity
vector (zero at the start) is added to the projected readout. Only the entities of a step are
encoded (SNAG's structure encoder "embedding" needs no graph); a GAT structure encoder runs over the
training graph and the rest is selected with `out_index`.

Loss: RotatE's self-adversarial negative sampling, -log sigmoid(score) on positives and
-sum_k w_k log sigmoid(-score_k) on negatives, w = softmax(adv_temperature * score) detached.
Self negatives (``negatives.py``): "adversarial" adds the kept entity as the (K+1)-th negative of
the self-adversarial softmax, where as the hardest negative it takes most of the weight; "separate"
adds its own -log sigmoid(-score(self)) term beside the K negatives (weight `self_negative_weight`),
so the query entity cannot take the softmax weight from the uniform ones; "pairwise" adds
-log sigmoid(score(positive) - score(self)), which only asks the true entity to outrank the query
entity. Legend: B batch, K negatives, U unique entities, N entities, D complex dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config.schema import CompletionConfig
from snag_dist.errors import ConfigError
from snag_dist.model.snag import SNAG
from snag_dist.model.spec import STRUCTURE
from snag_dist.tasks.completion.negatives import CompletionBatch
from snag_dist.tasks.completion.rotate import RotatE
from snag_dist.tasks.inputs import bucketed


def self_adversarial_loss(pos_B: torch.Tensor, neg_BK: torch.Tensor, valid_BK: torch.Tensor,
                          temperature: float) -> dict[str, torch.Tensor]:
    """RotatE's loss; invalid (filtered) negatives get weight 0, the others share a softmax."""
    logits = neg_BK.detach() * temperature if temperature > 0 else torch.zeros_like(neg_BK)
    weights = torch.softmax(logits.masked_fill(~valid_BK, -math.inf), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row with every negative filtered
    positive = -F.logsigmoid(pos_B).mean()
    negative = -(weights * F.logsigmoid(-neg_BK)).sum(1).mean()
    return {"loss": (positive + negative) / 2, "positive": positive.detach(), "negative": negative.detach()}


class CompletionModule(nn.Module):
    """SNAG + readout projection + RotatE. ``forward(batch) -> losses``."""

    def __init__(self, model: SNAG, ccfg: CompletionConfig, num_relations: int) -> None:
        super().__init__()
        hidden = model.cfg.hidden
        dim = ccfg.dim or hidden // 2
        if ccfg.readout == "graph" and STRUCTURE not in model.modalities:
            raise ConfigError("task.completion.readout=graph reads the structure token; add 'structure' to "
                              "model.modalities or use readout=mean")
        self.model, self.ccfg = model, ccfg
        self.rotate = RotatE(num_relations, dim, ccfg.margin, ccfg.distance)
        layers: list[nn.Module] = []
        for _ in range(ccfg.projection_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        last = nn.Linear(hidden, 2 * dim)
        # Start at RotatE's scale: coordinates ~U(-range, range) for unit-variance (LayerNorm) inputs,
        # so initial distances are near the margin instead of ~10x above it.
        nn.init.uniform_(last.weight, -self.rotate.range / math.sqrt(hidden), self.rotate.range / math.sqrt(hidden))
        nn.init.zeros_(last.bias)
        self.projection = nn.Sequential(*layers, last)
        # Optional free per-entity correction on top of the fused vector (starts at 0: pure SNAG).
        self.residual: nn.Embedding | None = None
        if ccfg.entity_residual:
            self.residual = nn.Embedding(model.spec.num_entities, 2 * dim)
            nn.init.zeros_(self.residual.weight)
        self.inputs = None  # set by the task (tasks/inputs.py); plain attribute, never broadcast
        self.last_weights: torch.Tensor | None = None

    def entity_vectors(self, ids_U: torch.Tensor) -> torch.Tensor:
        """(U, 2D) RotatE vectors of the fused representations of ``ids_U``."""
        out = self.inputs.encode(self.model, ids_U)
        self.last_weights = out.modality_weights.detach().mean(0)  # (bucket copies of one id weigh in)
        if self.ccfg.readout == "graph":
            readout = out.hidden_stack[:, out.modalities.index(STRUCTURE)]
        else:
            present = out.present[..., None].to(out.hidden_stack.dtype)
            readout = (out.hidden_stack * present).sum(1) / present.sum(1).clamp_min(1.0)
        # RotatE distances stay in float32 under bf16/fp16 autocast: a sum of 128 moduli in bf16 keeps
        # ~3 digits, too few to rank 15K candidates; only the encoders and fusion run in half precision.
        vectors = self.projection(readout).float()
        if self.residual is not None:
            vectors = vectors + self.residual(ids_U)
        return vectors

    def forward(self, batch: CompletionBatch) -> dict[str, torch.Tensor]:
        b = batch.triples.shape[0]
        ids = torch.cat([batch.triples[:, 0], batch.triples[:, 2], batch.negatives.flatten()])
        uniq_U, inv = torch.unique(ids, return_inverse=True)
        # padded here too (not only in inputs.encode), so that the projection sees bucketed rows as well
        ent = self.entity_vectors(bucketed(uniq_U))[:len(uniq_U)]
        pos, neg, own = self.rotate.train_scores(ent, batch, inv[:b], inv[b:2 * b],
                                                 inv[2 * b:].view_as(batch.negatives))
        valid = batch.valid
        if own is not None and self.ccfg.self_negative == "adversarial":
            neg, valid = torch.cat([neg, own[:, None]], 1), torch.cat([valid, batch.self_valid[:, None]], 1)
        losses = self_adversarial_loss(pos, neg, valid, self.ccfg.adv_temperature)
        if own is not None and self.ccfg.self_negative in ("separate", "pairwise"):
            keep = batch.self_valid.to(pos.dtype)
            term = F.logsigmoid(pos - own) if self.ccfg.self_negative == "pairwise" else F.logsigmoid(-own)
            term = -(term * keep).sum() / keep.sum().clamp_min(1.0)
            losses["loss"] = losses["loss"] + self.ccfg.self_negative_weight * term / 2
            losses["self"] = term.detach()
        if batch.weight != 1.0:  # the data-parallel mean over ranks is then the global batch's mean
            losses = {k: v * batch.weight for k, v in losses.items()}
        return losses

    @torch.no_grad()
    def entity_table(self, chunk: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 2D) clean (eval-mode) vectors of every entity (or of ``ids``), encoded ``chunk`` at a time."""
        was_training = self.training
        self.eval()
        ids = torch.arange(self.inputs.num_entities) if ids is None else ids
        table = torch.cat([self.entity_vectors(ids[a:a + chunk]) for a in range(0, len(ids), chunk)]).float()
        self.train(was_training)
        return table
