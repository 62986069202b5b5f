"""SNAG's entity-alignment objectives (GMI, ECIA, IIR) over a batch of aligned pairs.

All three reuse one in-batch contrastive loss, the "icl" loss of MCLEA/MEAformer: for each aligned
pair (l, r) of the batch, l must pick r among the batch's right entities, with the batch's other left
entities (same KG) as extra negatives; symmetrically for r. Inputs are L2-normalised, logits divided
by the temperature tau, and the two directions averaged.

- GMI  (global modality integration): on the attention-weighted joint embedding plus on the
  global-weight joint embedding.
- ECIA (entity-level modality alignment): per modality on the encoder outputs; each pair's term is
  weighted by the smaller of its two entities' modality weights, so a modality is trusted for a pair
  only as much as the fusion trusts it for both entities.
- IIR  (late intra-modal refinement): per modality on the fusion Transformer's hidden outputs.

ECIA and IIR each combine their per-modality losses by learned homoscedastic uncertainty
(Kendall et al. 2018): sum_m exp(-s_m) L_m + s_m, with one log-variance s_m per modality.
Pairs where either entity lacks a modality (present False) leave that modality's loss entirely:
neither as a positive nor as a negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snag_dist.config.schema import AlignmentConfig
from snag_dist.tasks.fused_nce import (
    Gram,
    WeightedSum,
    fused_info_nce,
    fused_joint_info_nce,
    fused_row_info_nce,
)

# Legend: B pairs in the batch, E entities, M modalities, H hidden, D any embedding dim.

@dataclass
class Sims:
    """Cosine similarities inside a batch of pairs: left x right, left x left, right x right (B, B).

    Row-sharded form (a data-parallel rank's share, ``pos`` set): rows are this rank's b pairs, columns
    the global batch: ab/aa (b, B) = its lefts vs all rights/lefts, ba/bb (b, B) = its rights vs all
    lefts/rights, and ``pos`` (b,) the global index of each row's pair.
    """

    ab: Tensor
    aa: Tensor
    bb: Tensor
    ba: Tensor | None = None
    pos: Tensor | None = None


def similarities(left_bd: Tensor, right_bd: Tensor, rows: slice | None = None) -> Sims:
    """Cosine matrices of the pairs' rows (all, or this rank's ``rows`` against all), in fp32 even
    under autocast: the logits divide them by tau, which would amplify bf16 rounding."""
    left_bd = F.normalize(left_bd.float(), dim=1)
    right_bd = F.normalize(right_bd.float(), dim=1)
    if rows is None:
        return Sims(*Gram.apply(left_bd, right_bd))
    mine_l, mine_r = left_bd[rows], right_bd[rows]
    pos = torch.arange(rows.start, rows.stop, device=left_bd.device)
    with torch.autocast(left_bd.device.type, enabled=False):
        return Sims(mine_l @ right_bd.T, mine_l @ left_bd.T, mine_r @ right_bd.T, mine_r @ left_bd.T, pos)


def joint_weights(w_left_bm: Tensor, w_right_bm: Tensor, unit_left_bm: Tensor, unit_right_bm: Tensor,
                  ) -> tuple[Tensor, Tensor]:
    """Weights w_m / |joint| that turn the per-modality cosines of n_m into those of concat_m(w_m * n_m).

    <joint_i, joint_j> = sum_m w_im w_jm <n_im, n_jm> and |joint_i|^2 = sum_m w_im^2 |n_im|^2, so
    GMI needs no (B, B, M*H) products of its own: it reuses ECIA's per-modality matrices (same
    result, 2 x 3 fewer B x B x M*H matmuls per step). ``unit_*`` is |n_m|^2 (1, or 0 for a zero row).
    """
    norm_l = (w_left_bm.pow(2) * unit_left_bm).sum(1).clamp_min(1e-24).sqrt()
    norm_r = (w_right_bm.pow(2) * unit_right_bm).sum(1).clamp_min(1e-24).sqrt()
    return w_left_bm / norm_l[:, None], w_right_bm / norm_r[:, None]


def joint_similarities(per_m: list[Sims], w_left_bm: Tensor, w_right_bm: Tensor,
                       unit_left_bm: Tensor, unit_right_bm: Tensor) -> Sims:
    """Cosines of the joint embeddings concat_m(w_m * n_m) from the per-modality cosines of n_m."""
    wl, wr = joint_weights(w_left_bm, w_right_bm, unit_left_bm, unit_right_bm)

    def combine(mats: list[Tensor], a: Tensor, b: Tensor) -> Tensor:
        return WeightedSum.apply(a, b, *mats)

    first = per_m[0]
    if first.pos is None:
        return Sims(combine([s.ab for s in per_m], wl, wr), combine([s.aa for s in per_m], wl, wl),
                    combine([s.bb for s in per_m], wr, wr))
    ml, mr = wl[first.pos], wr[first.pos]  # row-sharded: this rank's rows x the global batch
    return Sims(combine([s.ab for s in per_m], ml, wr), combine([s.aa for s in per_m], ml, wl),
                combine([s.bb for s in per_m], mr, wr), combine([s.ba for s in per_m], mr, wl), first.pos)


def joint_info_nce(per_m: list[Sims], w_left_bm: Tensor, w_right_bm: Tensor, unit_left_bm: Tensor,
                   unit_right_bm: Tensor, tau: float) -> Tensor:
    """``info_nce`` of ``joint_similarities``; over the whole batch the joint matrices never exist."""
    if per_m[0].pos is not None:
        return info_nce(joint_similarities(per_m, w_left_bm, w_right_bm, unit_left_bm, unit_right_bm), tau)
    wl, wr = joint_weights(w_left_bm, w_right_bm, unit_left_bm, unit_right_bm)
    return fused_joint_info_nce([s.ab for s in per_m], [s.aa for s in per_m], [s.bb for s in per_m], wl, wr, tau)


def info_nce(sims: Sims, tau: float, pair_weight_b: Tensor | None = None, valid_b: Tensor | None = None) -> Tensor:
    """In-batch InfoNCE both ways from the batch's cosine similarities (see contrastive_loss).

    Computed by one fused autograd function (``fused_nce``): same value and gradients as the
    written-out [cross-KG | same-KG] cross-entropy, without its many passes over (B, B) matrices.
    """
    if sims.pos is not None:
        return fused_row_info_nce(sims.ab, sims.aa, sims.ba, sims.bb, sims.pos, tau, pair_weight_b, valid_b)
    return fused_info_nce(sims.ab, sims.aa, sims.bb, tau, pair_weight_b, valid_b)


def contrastive_loss(
    left_bd: Tensor, right_bd: Tensor, tau: float,
    pair_weight_b: Tensor | None = None, valid_b: Tensor | None = None,
) -> Tensor:
    """In-batch InfoNCE both ways between aligned rows of left_bd and right_bd (B, D).

    pair_weight_b scales each pair's term; valid_b (bool) drops pairs entirely. The result is the
    weighted sum over valid pairs divided by their number (0 when none is valid). Memory O(B^2).
    """
    return info_nce(similarities(left_bd, right_bd), tau, pair_weight_b, valid_b)


class UncertaintyWeighting(nn.Module):
    """sum_m active_m * (exp(-s_m) L_m + s_m) with learnable log-variances s (Kendall et al.).

    Inactive terms (no valid pair this batch) are multiplied by 0 rather than skipped, so s_m
    still gets a (zero) gradient and data-parallel wrappers never see an unused parameter.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        # "log_var" in the name keeps it out of weight decay (the engine matches on it).
        self.log_var = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, loss_m: Tensor, active_m: Tensor) -> Tensor:
        terms_m = torch.exp(-self.log_var) * loss_m + self.log_var
        return (active_m.to(terms_m.dtype) * terms_m).sum()


class AlignmentLoss(nn.Module):
    """GMI + ECIA + IIR for a batch of aligned pairs, from the model's `SnagOutput`.

    A term whose weight is 0 is neither computed nor given parameters. Modalities named here but
    absent from the model output contribute nothing (inactive) in that batch.
    """

    def __init__(self, cfg: AlignmentConfig, modalities: list[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = list(modalities)
        self.ecia = UncertaintyWeighting(self.modalities) if cfg.ecia_weight > 0 else None
        self.iir = UncertaintyWeighting(self.modalities) if cfg.iir_weight > 0 else None
        self._rows: slice | None = None  # this call's row share (see forward)
        self._scale = 1.0

    def forward(self, out: Any, pairs: Tensor, rows: slice | None = None, scale: float = 1.0) -> dict[str, Tensor]:
        """out: SnagOutput over E entities; pairs (B, 2) long entity indices into E.

        Returns "loss" (to backprop) and detached "gmi", "ecia", "iir" and per-modality
        "ecia/<m>", "iir/<m>" for logging. Data-parallel: ``rows`` are this rank's pairs of the
        global batch ``pairs`` and ``scale`` the world size; every contrastive term is this rank's
        share times ``scale``, so the ranks' mean is the global-batch loss (and, averaged by DDP,
        its gradient).
        """
        self._rows, self._scale = rows, scale
        pairs = pairs.to(out.joint.device, torch.long)
        zero = out.joint.new_zeros(())
        total, logs = zero, {"gmi": zero, "ecia": zero, "iir": zero}
        need = self.cfg.gmi_weight > 0 or self.ecia is not None
        emb_sims = self._modality_sims(out, pairs) if need else {}
        if self.cfg.gmi_weight > 0:
            gmi = self._gmi(out, pairs, emb_sims)
            total, logs["gmi"] = total + self.cfg.gmi_weight * gmi, gmi
        if self.ecia is not None:
            ecia, per_m = self._per_modality(emb_sims, out, pairs, self.ecia, weighted=True)
            total, logs["ecia"] = total + self.cfg.ecia_weight * ecia, ecia
            logs.update({f"ecia/{m}": v for m, v in per_m.items()})
        if self.iir is not None:
            hidden_sims = {m: similarities(out.hidden[m][pairs[:, 0]], out.hidden[m][pairs[:, 1]], self._rows)
                           for m in self.modalities if m in out.hidden and m in out.modalities}
            iir, per_m = self._per_modality(hidden_sims, out, pairs, self.iir, weighted=False)
            total, logs["iir"] = total + self.cfg.iir_weight * iir, iir
            logs.update({f"iir/{m}": v for m, v in per_m.items()})
        return {"loss": total, **{k: v.detach() for k, v in logs.items()}}

    def _modality_sims(self, out: Any, pairs: Tensor) -> dict[str, Sims]:
        """Per-modality cosine matrices of the encoder outputs: shared by ECIA and GMI."""
        return {m: similarities(out.modality_emb[m][pairs[:, 0]], out.modality_emb[m][pairs[:, 1]], self._rows)
                for m in out.modalities}

    def _nce(self, sims: Sims, pair_weight_b: Tensor | None = None, valid_b: Tensor | None = None) -> Tensor:
        return info_nce(sims, self.cfg.tau, pair_weight_b, valid_b) * self._scale

    def _gmi(self, out: Any, pairs: Tensor, sims: dict[str, Sims]) -> Tensor:
        """Contrastive loss on the joint and the global-weight joint embeddings (from shared sims)."""
        left, right = pairs[:, 0], pairs[:, 1]
        per_m = [sims[m] for m in out.modalities]
        unit = torch.stack([out.modality_emb[m].norm(dim=1).gt(0).float() for m in out.modalities], 1)
        loss = out.joint.new_zeros(())
        for w in (out.modality_weights, out.global_entity_weights):
            joint = joint_info_nce(per_m, w[left].float(), w[right].float(), unit[left], unit[right], self.cfg.tau)
            loss = loss + joint * self._scale
        return loss

    def _per_modality(
        self, sims: dict[str, Sims], out: Any, pairs: Tensor, weighting: UncertaintyWeighting,
        weighted: bool,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Uncertainty-weighted sum of per-modality contrastive losses, and those losses."""
        left, right = pairs[:, 0], pairs[:, 1]
        zero = out.joint.new_zeros(())
        losses, active, per_m = [], [], {}
        for m in self.modalities:
            if m not in sims or m not in out.modalities:
                losses.append(zero)
                active.append(zero)
                continue
            col = out.modalities.index(m)
            valid_b = out.present[left, col] & out.present[right, col]
            weight_b = None
            if weighted:
                # x M as in the reference: weights average 1/M, so this keeps ECIA on IIR's scale.
                w_em = out.modality_weights.detach()
                weight_b = torch.minimum(w_em[left, col], w_em[right, col]) * len(out.modalities)
            loss = self._nce(sims[m], weight_b, valid_b)
            losses.append(loss)
            active.append(valid_b.any().to(loss.dtype))
            per_m[m] = loss
        return weighting(torch.stack(losses), torch.stack(active)), per_m
