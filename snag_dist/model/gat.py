"""Diagonal-weight graph attention: the structure encoder of EVA, MCLEA, MEAformer and SNAG.

Per layer and head k, every node is rescaled per dimension, g = w_k * h (a diagonal weight, not a
full matrix: the reference's `diag=True`), each edge j -> i gets the score
    s_ij = -LeakyReLU(a_dst_k . g_i + a_src_k . g_j)
which is soft-maxed over i's incoming edges (self-loop included), and h'_i = sum_j alpha_ij g_j.
Heads are averaged; ELU between layers, nothing after the last.

Edges are LOCAL node ids over the rows of `x`, so the same layer runs on the whole graph or on a
sampled neighbourhood. Shapes: N nodes, K heads, H hidden, P edges (after symmetrising).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.errors import DataError


def undirected_edges(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of the symmetric, de-duplicated graph plus one self-loop per node.

    The reference builds a 0/1 adjacency with both directions of every triple and the diagonal, so
    repeated triples and (h, t) vs (t, h) collapse to one edge; doing it here means callers may pass
    raw (head, tail) pairs from any relation. Returns (P,) long tensors sorted by dst.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise DataError(f"edge_index must be (2, num_edges), got {tuple(edge_index.shape)}")
    edge_index = edge_index.long()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise DataError(f"edge_index has ids outside [0, {num_nodes}): local ids over the given nodes expected")
    src, dst = edge_index
    off_diag = src != dst  # self-loops are re-added exactly once below
    src, dst = src[off_diag], dst[off_diag]
    both_src, both_dst = torch.cat([src, dst]), torch.cat([dst, src])
    key = torch.unique(both_dst * num_nodes + both_src)  # sorted, so edges come grouped by dst
    loops = torch.arange(num_nodes, device=edge_index.device)
    return torch.cat([key % num_nodes, loops]), torch.cat([key // num_nodes, loops])


def edge_softmax(score_PK: torch.Tensor, dst_P: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of edge scores over each destination node's incoming edges, per head."""
    idx = dst_P[:, None].expand_as(score_PK)
    with torch.no_grad():  # the max only stabilises exp(); its gradient cancels out
        max_NK = score_PK.new_full((num_nodes, score_PK.shape[1]), float("-inf"))
        max_NK.scatter_reduce_(0, idx, score_PK, reduce="amax", include_self=True)
    e_PK = torch.exp(score_PK - max_NK[dst_P])
    denom_NK = torch.zeros_like(max_NK).index_add_(0, dst_P, e_PK)
    return e_PK / denom_NK[dst_P]


class DiagGATLayer(nn.Module):
    """One multi-head diagonal-weight attention layer; heads averaged."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        # Reference init: diag weights to ones (the layer starts as attention-weighted averaging),
        # attention vectors uniform(+-1/sqrt(2H)).
        self.w = nn.Parameter(torch.ones(heads, hidden))
        bound = 1.0 / math.sqrt(2 * hidden)
        self.a_dst = nn.Parameter(torch.empty(heads, hidden).uniform_(-bound, bound))
        self.a_src = nn.Parameter(torch.empty(heads, hidden).uniform_(-bound, bound))
        self.attn_dropout = attn_dropout

    def forward(self, h_NH: torch.Tensor, src_P: torch.Tensor, dst_P: torch.Tensor) -> torch.Tensor:
        n = h_NH.shape[0]
        g_NKH = h_NH[:, None, :] * self.w
        s_dst_NK = (g_NKH * self.a_dst).sum(-1)
        s_src_NK = (g_NKH * self.a_src).sum(-1)
        # The minus follows the reference (pyGAT's sparse layer: exp(-leakyrelu(.))).
        score_PK = -F.leaky_relu(s_dst_NK[dst_P] + s_src_NK[src_P], negative_slope=0.2)
        alpha_PK = edge_softmax(score_PK, dst_P, n)
        alpha_PK = F.dropout(alpha_PK, self.attn_dropout, training=self.training)
        out_NKH = torch.zeros_like(g_NKH).index_add_(0, dst_P, alpha_PK[..., None] * g_NKH[src_P])
        return out_NKH.mean(dim=1)


class GAT(nn.Module):
    """A stack of DiagGATLayer: ELU between layers, no activation after the last."""

    def __init__(self, hidden: int, layers: int = 2, heads: int = 2, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DiagGATLayer(hidden, heads, attn_dropout) for _ in range(layers))

    def forward(self, x_NH: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x_NH: (N, H) node inputs; edge_index: (2, num_edges) local ids. Returns (N, H)."""
        src_P, dst_P = undirected_edges(edge_index.to(x_NH.device), x_NH.shape[0])
        h = x_NH
        for i, layer in enumerate(self.layers):
            h = layer(h, src_P, dst_P)
            if i + 1 < len(self.layers):
                h = F.elu(h)
        return h
