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
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.errors import DataError

# CSR matmul is stable for what we use (CSR @ dense, sampled_addmm); the beta notice is noise in logs.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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
    loops = torch.arange(num_nodes, device=edge_index.device)
    both_src, both_dst = torch.cat([src, dst, loops]), torch.cat([dst, src, loops])
    # Sorted (dst, src) keys: edges grouped by dst, i.e. a coalesced COO matrix (rows = dst).
    key = torch.unique(both_dst * num_nodes + both_src)
    return key % num_nodes, key // num_nodes


@dataclass(frozen=True)
class Edges:
    """Symmetrised edges as CSR both ways: rows = dst (aggregation) and rows = src (its transpose)."""

    src: torch.Tensor  # (P,) sorted by (dst, src)
    dst: torch.Tensor
    crow: torch.Tensor  # (N+1,) CSR row pointers over dst
    perm_t: torch.Tensor  # (P,) order of the edges sorted by (src, dst)
    crow_t: torch.Tensor  # (N+1,) CSR row pointers over src
    num_nodes: int

    @classmethod
    def build(cls, edge_index: torch.Tensor, num_nodes: int) -> Edges:
        src, dst = undirected_edges(edge_index, num_nodes)
        perm_t = torch.argsort(src * num_nodes + dst)
        return cls(src, dst, _crow(dst, num_nodes), perm_t, _crow(src[perm_t], num_nodes), num_nodes)


def _crow(rows_sorted: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(rows_sorted, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _EdgeSpMM(torch.autograd.Function):
    """out_i = sum_j alpha_ij g_j over the edges, with a sparse backward.

    torch.sparse.mm's backward for the sparse values forms a dense N x N gradient (6 GB and ~70 s
    per step on DBP15K); here the value gradient is <grad_out_dst, g_src> per edge (an SDDMM).
    """

    @staticmethod
    def forward(ctx, alpha_P: torch.Tensor, g_NH: torch.Tensor, edges: Edges) -> torch.Tensor:
        # Sparse CSR kernels have no bf16/fp16 on CPU: under mixed precision this op runs in fp32.
        ctx.dtypes = alpha_P.dtype, g_NH.dtype
        alpha_P, g_NH = _widen(alpha_P), _widen(g_NH)
        n = edges.num_nodes
        adj = torch.sparse_csr_tensor(edges.crow, edges.src, alpha_P, (n, n), check_invariants=False)
        ctx.save_for_backward(alpha_P, g_NH)
        ctx.edges = edges
        with torch.autocast(g_NH.device.type, enabled=False):
            return adj @ g_NH

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):
        with torch.autocast(grad_NH.device.type, enabled=False):
            grad_alpha, grad_g, _ = _EdgeSpMM._backward(ctx, _widen(grad_NH))
        return (grad_alpha.to(ctx.dtypes[0]) if grad_alpha is not None else None,
                grad_g.to(ctx.dtypes[1]) if grad_g is not None else None, None)

    @staticmethod
    def _backward(ctx, grad_NH: torch.Tensor):
        alpha_P, g_NH = ctx.saved_tensors
        e: Edges = ctx.edges
        grad_alpha = grad_g = None
        if ctx.needs_input_grad[1]:
            adj_t = torch.sparse_csr_tensor(e.crow_t, e.dst[e.perm_t], alpha_P[e.perm_t], (e.num_nodes,) * 2,
                                             check_invariants=False)
            grad_g = adj_t @ grad_NH
        if ctx.needs_input_grad[0]:  # SDDMM: (grad @ g^T) sampled at the edges, in CSR order
            pattern = torch.sparse_csr_tensor(e.crow, e.src, torch.zeros_like(alpha_P), (e.num_nodes,) * 2,
                                              check_invariants=False)
            grad_alpha = torch.sparse.sampled_addmm(pattern, grad_NH.contiguous(), g_NH.T, beta=0.0).values()
        return grad_alpha, grad_g, None


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

    def forward(self, h_NH: torch.Tensor, edges: Edges) -> torch.Tensor:
        n, src_P, dst_P = h_NH.shape[0], edges.src, edges.dst
        # The weight is diagonal, so a . (w * h) = h . (w * a) and sum_j alpha_ij (w * h_j) =
        # w * (sum_j alpha_ij h_j): scores are one (N, H) @ (H, K) product and the per-head
        # rescaled features (N, K, H) are never built.
        s_dst_NK = h_NH @ (self.w * self.a_dst).T
        s_src_NK = h_NH @ (self.w * self.a_src).T
        # The minus follows the reference (pyGAT's sparse layer: exp(-leakyrelu(.))).
        score_PK = -F.leaky_relu(s_dst_NK[dst_P] + s_src_NK[src_P], negative_slope=0.2)
        alpha_PK = edge_softmax(score_PK, dst_P, n)
        alpha_PK = F.dropout(alpha_PK, self.attn_dropout, training=self.training)
        # One sparse (N x N) @ (N x H) product per head: never materialises the (P, K, H) edge
        # messages (1 GB per layer on DBP15K).
        heads = self.w.shape[0]
        out = None
        for k in range(heads):
            term = _EdgeSpMM.apply(alpha_PK[:, k].contiguous(), h_NH, edges) * self.w[k]
            out = term if out is None else out + term
        return out / heads


class GAT(nn.Module):
    """A stack of DiagGATLayer: ELU between layers, no activation after the last."""

    def __init__(self, hidden: int, layers: int = 2, heads: int = 2, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DiagGATLayer(hidden, heads, attn_dropout) for _ in range(layers))
        self._cache_key: tuple | None = None
        self._cache: Edges | None = None

    def _edges(self, edge_index: torch.Tensor, n: int) -> Edges:
        """Symmetrised edges, cached while the same graph tensor is passed (every full-graph step)."""
        # The checksum guards against a new graph allocated at a freed tensor's address.
        key = (edge_index.data_ptr(), tuple(edge_index.shape), n, str(edge_index.device), int(edge_index.sum()))
        if self._cache_key != key:
            self._cache = Edges.build(edge_index, n)
            self._cache_key = key
        return self._cache

    def forward(self, x_NH: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x_NH: (N, H) node inputs; edge_index: (2, num_edges) local ids. Returns (N, H)."""
        edges = self._edges(edge_index.to(x_NH.device), x_NH.shape[0])
        h = x_NH
        for i, layer in enumerate(self.layers):
            h = layer(h, edges)
            if i + 1 < len(self.layers):
                h = F.elu(h)
        return h
