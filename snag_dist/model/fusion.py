"""Fusion of the M modality tokens of each entity, and the per-entity modality weights.

"transformer" (SNAG / MEAformer): post-LN BERT layers over the M tokens; the modality weights come
from the last layer's attention probabilities: the attention each modality receives, summed over
heads and query tokens, scaled by 1/sqrt(M * heads) and soft-maxed over modalities.
"concat" (MCLEA / EVA-style baseline): no mixing; one learned weight per modality (softmax).
Absent modalities (present False) are never attended to and get weight 0; the rest renormalise.
E entities, M modality tokens, H hidden, K heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.config.schema import ModelConfig
from snag_dist.errors import ConfigError
from snag_dist.registry import Registry

FUSIONS: Registry[type[nn.Module]] = Registry("fusion")


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # (E, M, H) per-token outputs
    modality_weights: torch.Tensor  # (E, M), each row sums to 1 over present modalities
    attention: torch.Tensor | None  # (E, K, M, M) last layer's attention probabilities [query, key]


def masked_softmax(logits_EM: torch.Tensor, present_EM: torch.Tensor) -> torch.Tensor:
    """Softmax over present entries only; absent entries are exactly 0."""
    logits_EM = logits_EM.masked_fill(~present_EM, torch.finfo(logits_EM.dtype).min)
    # The product zeroes rows with nothing present (softmax alone would make them uniform).
    return F.softmax(logits_EM, dim=-1) * present_EM


class SelfAttention(nn.Module):
    """Multi-head self-attention over the modality tokens; absent tokens are masked as keys."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"model.hidden ({hidden}) must be divisible by model.fusion_heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h_EMH: torch.Tensor, present_EM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, m, hid = h_EMH.shape
        if m == 1 and not (self.training and self.dropout.p > 0):
            # One token (e.g. structure only): the softmax over a single key is exactly 1 whether the
            # key is present or masked, so the context is the value itself, bit for bit, and the query
            # and key gradients are exactly 0. Skipping them saves two matmuls and the per-head products.
            return self.value(h_EMH), h_EMH.new_ones(e, self.heads, 1, 1)
        return self.attend(h_EMH, present_EM)

    def attend(self, h_EMH: torch.Tensor, present_EM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The general path: scaled dot-product attention of every token over the present ones."""
        e, m, hid = h_EMH.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (E, M, H) -> (E, M, K, H/K), a view
            return t.view(e, m, self.heads, self.head_dim)

        q, k, v = split(self.query(h_EMH)), split(self.key(h_EMH)), split(self.value(h_EMH))
        # einsum on the token-major views: the same batched products as moving the heads forward first,
        # without the transposed copies (bit for bit equal, and faster on CPU: benchmarks/RESULTS.md §4).
        scores_EKMM = torch.einsum("eikd,ejkd->ekij", q, k) / math.sqrt(self.head_dim)
        scores_EKMM = scores_EKMM.masked_fill(~present_EM[:, None, None, :], torch.finfo(scores_EKMM.dtype).min)
        probs_EKMM = F.softmax(scores_EKMM, dim=-1)
        context_EMKD = torch.einsum("ekij,ejkd->eikd", self.dropout(probs_EKMM), v)
        return context_EMKD.reshape(e, m, hid), probs_EKMM


class BertLayer(nn.Module):
    """Post-LN Transformer layer as in BERT (and the reference): attention, then optional GELU FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.attention = SelfAttention(h, cfg.fusion_heads, cfg.dropout)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=1e-12)
        self.use_intermediate = cfg.use_intermediate
        if cfg.use_intermediate:
            self.intermediate = nn.Linear(h, cfg.intermediate)
            self.output = nn.Linear(cfg.intermediate, h)
            self.out_norm = nn.LayerNorm(h, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h_EMH: torch.Tensor, present_EM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, probs_EKMM = self.attention(h_EMH, present_EM)
        h_EMH = self.attn_norm(h_EMH + self.dropout(self.attn_out(context)))
        if self.use_intermediate:
            ffn = self.output(F.gelu(self.intermediate(h_EMH)))
            h_EMH = self.out_norm(h_EMH + self.dropout(ffn))
        return h_EMH, probs_EKMM


@FUSIONS.register("transformer")
class TransformerFusion(nn.Module):
    """SNAG's fusion: BERT layers over the tokens; modality weights from the last layer's attention."""

    def __init__(self, cfg: ModelConfig, num_modalities: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.heads = cfg.fusion_heads
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.fusion_layers))

    def forward(self, tokens_EMH: torch.Tensor, present_EM: torch.Tensor) -> FusionOutput:
        h_EMH, probs_EKMM = tokens_EMH, None
        for layer in self.layers:
            h_EMH, probs_EKMM = layer(h_EMH, present_EM)
        # Weights use the probabilities before attention dropout: dropout regularises the mixing,
        # it is not part of how much a modality is attended to. Absent queries do not vote.
        received_EM = (probs_EKMM * present_EM[:, None, :, None]).sum(dim=(1, 2))
        logits_EM = received_EM / math.sqrt(self.num_modalities * self.heads)
        return FusionOutput(h_EMH, masked_softmax(logits_EM, present_EM), probs_EKMM)


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """MCLEA/EVA-style: tokens pass through unchanged; one learned softmax weight per modality."""

    def __init__(self, cfg: ModelConfig, num_modalities: int) -> None:
        super().__init__()
        # Named *global_weights so optimiser grouping exempts it from weight decay, like the model's own.
        self.global_weights = nn.Parameter(torch.ones(num_modalities))

    def forward(self, tokens_EMH: torch.Tensor, present_EM: torch.Tensor) -> FusionOutput:
        logits_EM = self.global_weights.expand(tokens_EMH.shape[0], -1)
        return FusionOutput(tokens_EMH, masked_softmax(logits_EM, present_EM), None)


def build_fusion(cfg: ModelConfig, num_modalities: int) -> nn.Module:
    return FUSIONS.get(cfg.fusion)(cfg, num_modalities)
