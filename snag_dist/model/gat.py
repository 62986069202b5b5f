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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from snag_dist.errors import DataError

if TYPE_CHECKING:
    from snag_dist.model.sampling import SampledGraph

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
    """Edges into ``num_dst`` destination rows from ``num_src`` source rows, as CSR both ways: rows =
    dst (aggregation) and rows = src (its transpose). The whole graph is the square case; a
    layer that only needs some output rows gets the rectangular block of their incoming edges
    (`receptive`), whose destinations sit among its sources at ``dst_pos`` (self-loops).

    The CSR index tensors are int32 when the graph allows it: the sparse kernels run ~20 % faster.
    """

    src: torch.Tensor  # (P,) local source rows, sorted by (dst, src)
    dst: torch.Tensor  # (P,) local destination rows
    crow: torch.Tensor  # (num_dst+1,) CSR row pointers over dst
    col: torch.Tensor  # (P,) src in the CSR index dtype
    perm_t: torch.Tensor  # (P,) order of the edges sorted by (src, dst)
    crow_t: torch.Tensor  # (num_src+1,) CSR row pointers over src
    col_t: torch.Tensor  # (P,) dst[perm_t] in the CSR index dtype
    num_dst: int
    num_src: int
    dst_pos: torch.Tensor | None = None  # (num_dst,) row of each destination among the sources; None: same rows

    @classmethod
    def build(cls, edge_index: torch.Tensor, num_nodes: int) -> Edges:
        src, dst = undirected_edges(edge_index, num_nodes)
        return cls.from_sorted(src, dst, num_nodes, num_nodes)

    @classmethod
    def from_sorted(cls, src: torch.Tensor, dst: torch.Tensor, num_dst: int, num_src: int,
                    dst_pos: torch.Tensor | None = None) -> Edges:
        """From (P,) local ids sorted by (dst, src)."""
        perm_t = torch.argsort(src * num_dst + dst)
        index = torch.int32 if max(num_dst, num_src, src.numel()) < 2**31 else torch.int64
        return cls(src, dst, _crow(dst, num_dst).to(index), src.to(index), perm_t,
                   _crow(src[perm_t], num_src).to(index), dst[perm_t].to(index), num_dst, num_src, dst_pos)

    def receptive(self, rows: torch.Tensor) -> tuple[Edges, torch.Tensor]:
        """The edges into ``rows`` (sorted, unique destination ids of this square graph) as a
        (len(rows) x S) block over local ids, and the S sorted source ids it reads (rows among them)."""
        crow = self.crow.long()
        start, count = crow[rows], crow[rows + 1] - crow[rows]
        total = int(count.sum())
        offsets = count.cumsum(0) - count
        eid = torch.repeat_interleave(start - offsets, count, output_size=total) + torch.arange(
            total, device=rows.device)
        src_global = self.src[eid]
        sources = torch.unique(torch.cat([src_global, rows]))
        local_src = torch.searchsorted(sources, src_global)
        local_dst = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count, output_size=total)
        sub = Edges.from_sorted(local_src, local_dst, len(rows), len(sources), torch.searchsorted(sources, rows))
        return sub, sources

    def adjacency(self, values_P: torch.Tensor) -> torch.Tensor:
        """(num_dst, num_src) CSR matrix with values_P (in edge order) at (dst, src)."""
        return torch.sparse_csr_tensor(self.crow, self.col, values_P, (self.num_dst, self.num_src),
                                       check_invariants=False)

    def transposed(self, values_P: torch.Tensor) -> torch.Tensor:
        """The transpose of ``adjacency(values_P)``, as CSR."""
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values_P[self.perm_t], (self.num_src, self.num_dst),
                                       check_invariants=False)


def _crow(rows_sorted: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(rows_sorted, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Scratch:
    """Reusable buffers for intermediates that no autograd node keeps: a fresh 50 MB tensor cost
    more in page faults (~0.1 s on DBP15K) than the sparse product written into it. One flat
    buffer per (slot, dtype, device), grown to the largest size asked for; shapes may vary (a
    restricted GAT's row counts change every step)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._bufs[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)


def _spmm_into(out: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """out = sparse @ dense, written in place (``sparse @ dense`` allocates, zero-fills and copies)."""
    return torch.addmm(out, sparse, dense, beta=0.0, out=out)


class _HeadMeanSpMM(torch.autograd.Function):
    """out = mean_k (A_k @ h) * w_k: the heads' aggregations, A_k the (N, N) attention of head k
    (alpha[:, k] on the edges), w_k its diagonal weight; with a sparse backward.

    torch.sparse.mm's backward for the sparse values forms a dense N x N gradient (6 GB and ~70 s
    per step on DBP15K); here the value gradient is <grad_out_dst * w_k / K, h_src> per edge (an
    SDDMM). The diagonal weight commutes with the row mixing, so the input gradient is
    sum_k (A_k^T @ grad) * w_k / K and the weight's sum_n (A_k^T @ grad) * h / K: one transposed
    product per head serves both.
    """

    @staticmethod
    def forward(ctx, alpha_PK: torch.Tensor, h_NH: torch.Tensor, w_KH: torch.Tensor, edges: Edges,
                scratch: Scratch) -> torch.Tensor:
        # Sparse CSR kernels have no bf16/fp16 on CPU: under mixed precision this op runs in fp32.
        ctx.dtypes = alpha_PK.dtype, h_NH.dtype, w_KH.dtype
        alpha_PK, h_NH, w_KH = _widen(alpha_PK), _widen(h_NH), _widen(w_KH)
        heads = w_KH.shape[0]
        out = h_NH.new_empty(edges.num_dst, h_NH.shape[1])
        with torch.autocast(h_NH.device.type, enabled=False):
            for k in range(heads):
                dest = out if k == 0 else scratch.get(0, out)
                _spmm_into(dest, edges.adjacency(alpha_PK[:, k].contiguous()), h_NH)
                if k == 0:
                    out.mul_(w_KH[k] / heads)
                else:
                    out.addcmul_(dest, w_KH[k] / heads)
        ctx.save_for_backward(alpha_PK, h_NH, w_KH)
        ctx.edges, ctx.scratch = edges, scratch
        return out

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):
        with torch.autocast(grad_NH.device.type, enabled=False):
            grads = _HeadMeanSpMM._backward(ctx, _widen(grad_NH).contiguous())
        return *(g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes)), None, None

    @staticmethod
    def _backward(ctx, grad_NH: torch.Tensor):
        alpha_PK, h_NH, w_KH = ctx.saved_tensors
        edges, scratch = ctx.edges, ctx.scratch
        need_alpha, need_h, need_w = ctx.needs_input_grad[:3]
        heads = w_KH.shape[0]
        grad_alpha = alpha_PK.new_empty(alpha_PK.shape) if need_alpha else None
        grad_w = w_KH.new_empty(w_KH.shape) if need_w else None
        grad_h = None
        pattern = edges.adjacency(torch.zeros_like(alpha_PK[:, 0])) if need_alpha else None
        for k in range(heads):
            scale = w_KH[k] / heads
            if need_h or need_w:
                back = _spmm_into(scratch.get(0, h_NH), edges.transposed(alpha_PK[:, k]), grad_NH)
                if need_w:
                    grad_w[k] = torch.mul(back, h_NH, out=scratch.get(1, h_NH)).sum(0) / heads
                if need_h:
                    grad_h = torch.mul(back, scale) if grad_h is None else grad_h.addcmul_(back, scale)
            if need_alpha:  # SDDMM: (grad * w_k / K) @ h^T sampled at the edges, in CSR order
                scaled = torch.mul(grad_NH, scale, out=scratch.get(2, grad_NH))
                grad_alpha[:, k] = torch.sparse.sampled_addmm(pattern, scaled, h_NH.T, beta=0.0).values()
        return grad_alpha, grad_h, grad_w


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

    def forward(self, h_NH: torch.Tensor, edges: Edges, scratch: Scratch | None = None) -> torch.Tensor:
        """h_NH (num_src, H) over the edges' source rows -> (num_dst, H); ``scratch`` lends buffers
        (a stack shares one)."""
        src_P, dst_P = edges.src, edges.dst
        # The weight is diagonal, so a . (w * h) = h . (w * a) and sum_j alpha_ij (w * h_j) =
        # w * (sum_j alpha_ij h_j): scores are one (N, H) @ (H, K) product and the per-head
        # rescaled features (N, K, H) are never built.
        heads = self.w.shape[0]
        # dst and src scores from one product, so one (N, H) gradient in the backward
        s_N2K = h_NH @ (self.w * torch.stack([self.a_dst, self.a_src])).flatten(0, 1).T
        s_dst_NK, s_src_NK = s_N2K[:, :heads], s_N2K[:, heads:]
        if edges.dst_pos is not None:
            s_dst_NK = s_dst_NK[edges.dst_pos]
        # The minus follows the reference (pyGAT's sparse layer: exp(-leakyrelu(.))).
        score_PK = -F.leaky_relu(s_dst_NK[dst_P] + s_src_NK[src_P], negative_slope=0.2)
        alpha_PK = edge_softmax(score_PK, dst_P, edges.num_dst)
        alpha_PK = F.dropout(alpha_PK, self.attn_dropout, training=self.training)
        # One sparse (N x N) @ (N x H) product per head: never materialises the (P, K, H) edge
        # messages (1 GB per layer on DBP15K).
        return _HeadMeanSpMM.apply(alpha_PK, h_NH, self.w, edges, scratch or Scratch())


class GAT(nn.Module):
    """A stack of DiagGATLayer: ELU between layers, no activation after the last."""

    def __init__(self, hidden: int, layers: int = 2, heads: int = 2, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DiagGATLayer(hidden, heads, attn_dropout) for _ in range(layers))
        self._cache_key: tuple | None = None
        self._cache: Edges | None = None
        self._scratch = Scratch()
        # With out_index, restrict to the receptive field only for at most this share of the nodes
        # (DBP15K: a 3,500-pair step asks for 18 %, test evaluation for 53 %).
        self.restrict_below = 0.25

    def _edges(self, edge_index: torch.Tensor, n: int) -> Edges:
        """Symmetrised edges, cached while the same graph tensor is passed (every full-graph step)."""
        # The checksum guards against a new graph allocated at a freed tensor's address.
        key = (edge_index.data_ptr(), tuple(edge_index.shape), n, str(edge_index.device), int(edge_index.sum()))
        if self._cache_key != key:
            self._cache = Edges.build(edge_index, n)
            self._cache_key = key
        return self._cache

    def forward(self, x_NH: torch.Tensor, edge_index: torch.Tensor, out_index: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """x_NH: (N, H) node inputs; edge_index: (2, num_edges) local ids. Returns (N, H), or with
        ``out_index`` (O,) the rows of those nodes only, (O, H).

        With ``out_index`` each layer computes only the rows the next one reads: the last layer
        the asked-for nodes, the one before their neighbours, and so on (the receptive field).
        Same result as the whole graph then selecting; on DBP15K a 550-pair step's 1,100 entities
        need 9K of the 40K first-layer rows, and any step's last layer only the batch's rows.
        """
        edges = self._edges(edge_index.to(x_NH.device), x_NH.shape[0])
        # Restrict only for a small share of the nodes: beyond it the receptive field is ~the graph.
        restrict = out_index is not None and out_index.numel() <= self.restrict_below * x_NH.shape[0]
        plan, h = [edges] * len(self.layers), x_NH
        if restrict:
            wanted, where = torch.unique(out_index, return_inverse=True)
            plan, rows = [], wanted
            for _ in self.layers:
                sub, rows = edges.receptive(rows)
                plan.append(sub)
            plan.reverse()
            h = x_NH[rows]
        for i, (layer, layer_edges) in enumerate(zip(self.layers, plan)):
            h = layer(h, layer_edges, self._scratch)
            if i + 1 < len(self.layers):
                h = F.elu(h)
        if out_index is None:
            return h
        return h[where] if restrict else h[out_index]  # restricted: the last layer's rows are `wanted`

    def forward_sampled(self, x_SH: torch.Tensor, sampled: SampledGraph) -> torch.Tensor:
        """x_SH: (S, H) inputs of ``sampled.nodes`` -> (T, H) outputs of ``sampled.targets``, each
        layer over its block of ``sampled.plan`` (see ``snag_dist.model.sampling``)."""
        if len(sampled.plan) != len(self.layers):
            raise DataError(f"sampled graph has {len(sampled.plan)} layers of edges, the GAT {len(self.layers)}")
        if x_SH.shape[0] != sampled.nodes.numel():
            raise DataError(f"x has {x_SH.shape[0]} rows, the sampled graph reads {sampled.nodes.numel()} nodes")
        if sampled.nodes.device != x_SH.device:
            sampled = sampled.to(x_SH.device)
        h = x_SH
        for i, (layer, layer_edges) in enumerate(zip(self.layers, sampled.plan)):
            h = layer(h, layer_edges, self._scratch)
            if i + 1 < len(self.layers):
                h = F.elu(h)
        return h
