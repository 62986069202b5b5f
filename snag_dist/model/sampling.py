"""Seeded fan-out sampling of a batch's k-hop neighbourhood, as the GAT's per-layer edge blocks.

``sample_subgraph`` walks from the output layer back to the input, like ``GAT.forward``'s
restricted path (``Edges.receptive``), but keeps at most ``fanout`` neighbours of each
destination row (plus its self-loop, which every node has in the full GAT). A step then costs
O(batch x fanout^layers) GAT rows and edges instead of O(N). With fan-out -1 (all neighbours)
the blocks are exactly the receptive ones, so ``GAT.forward_sampled`` gives the full-graph rows.

Which neighbours a destination keeps is a pure function of (seed, layer, destination, its
degree): a row with at most ``fanout`` neighbours keeps them all, a larger one keeps the CSR
positions hash(seed, layer, destination, j) mod degree, j < fanout (with replacement, repeats
dropped). An entity's sampled neighbourhood therefore does not depend on the batch it is in or on
the process that samples it, and a hub costs ``fanout`` reads.

The graph is a CSR adjacency (``indptr`` (N+1,), ``indices``), undirected, de-duplicated,
neighbours of a row sorted, as ``snag_dist.data.graph_store.GraphStore`` writes it; numpy
memmaps are read only at the rows visited. Shapes: B targets, R rows of a layer, E edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from snag_dist.errors import ConfigError, DataError
from snag_dist.model.gat import Edges

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class SampledGraph:
    """A batch's sampled neighbourhood: ``plan[l]`` is layer l's block of edges (input layer
    first), reading ``nodes`` (global ids, sorted) at the input and giving ``targets`` (sorted,
    unique global ids) at the output."""

    nodes: torch.Tensor  # (S,) global ids of the first layer's source rows
    plan: list[Edges]  # one per GAT layer, input layer first
    targets: torch.Tensor  # (T,) global ids of the last layer's output rows

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any of the sampled targets, repeats allowed) in the output."""
        return torch.searchsorted(self.targets, ids.to(self.targets.device))

    def to(self, device: torch.device | str) -> SampledGraph:
        def move(edges: Edges) -> Edges:
            return replace(edges, **{f.name: getattr(edges, f.name).to(device) for f in fields(edges)
                                     if isinstance(getattr(edges, f.name), torch.Tensor)})

        return SampledGraph(self.nodes.to(device), [move(e) for e in self.plan], self.targets.to(device))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic), in place."""
    z += _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def row_keys(seed: int, layer: int, dst: np.ndarray) -> np.ndarray:
    """(R,) uint64 per-destination hash state of (seed, layer, dst): ``edge_hash`` mixes src into it."""
    # Hand-written rather than a torch/numpy RNG: a counter-based hash of the edge itself makes an
    # entity's sampled neighbourhood independent of which process or batch draws it, so 1 and 2
    # processes (or any batch split) train on the same subgraph.
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        base ^= np.uint64(layer)
        base = _mix(base)
        return _mix(np.asarray(dst).astype(np.uint64) ^ base)


def edge_hash(seed: int, layer: int, dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """(E,) uint64 hash of each (seed, layer, dst, src) edge."""
    return _mix_src(row_keys(seed, layer, dst), src)


def _mix_src(keys_E: np.ndarray, src_E: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(keys_E ^ np.asarray(src_E).astype(np.uint64))


def _check_fanouts(fanouts: Sequence[int]) -> list[int]:
    fanouts = list(fanouts)
    if not fanouts:
        raise ConfigError("model.gat_fanout: one fan-out per GAT layer expected, got none")
    for f in fanouts:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f == 0 or f < -1:
            raise ConfigError(f"model.gat_fanout: bad value {f!r} (a positive number of neighbours, or -1 for all)")
    return [int(f) for f in fanouts]


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def _neighbours(indptr: np.ndarray, indices: np.ndarray, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (local dst, global src) edges of ``rows``, grouped by dst, src ascending within."""
    start_R = np.asarray(indptr[rows_R], dtype=np.int64)
    count_R = np.asarray(indptr[rows_R + 1], dtype=np.int64) - start_R
    total = int(count_R.sum())
    dst_E = np.repeat(np.arange(len(rows_R), dtype=np.int64), count_R)
    eid_E = np.arange(total, dtype=np.int64) + np.repeat(start_R - (np.cumsum(count_R) - count_R), count_R)
    src_E = np.asarray(indices[eid_E], dtype=np.int64)  # a memmap reads only these entries
    return dst_E, src_E


def _sample_edges(indptr: np.ndarray, indices: np.ndarray, rows_R: np.ndarray, fanout: int, seed: int,
                  layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``fanout`` (local dst, global src) edges per destination: all of a row with at most
    ``fanout`` neighbours; otherwise ``fanout`` positions drawn with replacement from
    hash(seed, layer, dst, j) mod degree, duplicates dropped. Only the drawn CSR entries are read,
    so a hub costs ``fanout`` reads, not its degree (a step stays O(batch x fanout^k) on power-law
    graphs)."""
    start_R = np.asarray(indptr[rows_R], dtype=np.int64)
    count_R = np.asarray(indptr[rows_R + 1], dtype=np.int64) - start_R
    light = np.flatnonzero(count_R <= fanout)
    dst_l, src_l = _neighbours(indptr, indices, rows_R[light])
    heavy = np.flatnonzero(count_R > fanout)
    if heavy.size == 0:
        return light[dst_l], src_l
    draw_E = np.tile(np.arange(fanout, dtype=np.uint64), len(heavy))
    hash_E = _mix_src(np.repeat(row_keys(seed, layer, rows_R[heavy]), fanout), draw_E)
    pos_E = (hash_E % np.repeat(count_R[heavy], fanout).astype(np.uint64)).astype(np.int64)
    dst_h = np.repeat(heavy, fanout)
    src_h = np.asarray(indices[np.repeat(start_R[heavy], fanout) + pos_E], dtype=np.int64)
    key = np.unique(dst_h * (int(indptr.shape[0]) + 1) + src_h)  # drop repeats of an edge
    dst_h, src_h = np.divmod(key, int(indptr.shape[0]) + 1)
    return np.concatenate([light[dst_l], dst_h]), np.concatenate([src_l, src_h])


def sample_subgraph(indptr, indices, targets: torch.Tensor, fanouts: Sequence[int], seed: int) -> SampledGraph:
    """The per-layer edge blocks of ``targets``' sampled neighbourhood.

    indptr (N+1,), indices: CSR adjacency (numpy arrays or memmaps, or CPU tensors); targets (B,)
    global ids, any order, repeats allowed; fanouts: neighbours kept per destination row, one per
    GAT layer in ``GAT.layers`` order, -1 = all; seed: the sampling seed (e.g. per epoch).
    """
    fanouts = _check_fanouts(fanouts)
    indptr, indices = _as_numpy(indptr), _as_numpy(indices)
    num_nodes = len(indptr) - 1
    rows_R = np.unique(np.asarray(_as_numpy(targets), dtype=np.int64))
    if rows_R.size and (rows_R[0] < 0 or rows_R[-1] >= num_nodes):
        raise DataError(f"sample_subgraph: target ids outside [0, {num_nodes})")
    wanted = torch.from_numpy(rows_R)
    plan = []
    for layer in reversed(range(len(fanouts))):
        if fanouts[layer] > 0:
            dst_E, src_E = _sample_edges(indptr, indices, rows_R, fanouts[layer], seed, layer)
        else:
            dst_E, src_E = _neighbours(indptr, indices, rows_R)
        not_loop = src_E != rows_R[dst_E]  # the self-loop is added below, whatever the CSR holds
        dst_E, src_E = dst_E[not_loop], src_E[not_loop]
        sources_S = np.unique(np.concatenate([src_E, rows_R]))
        dst_pos_R = np.searchsorted(sources_S, rows_R)
        # The self-loops join, and the block is sorted by (dst, src) as Edges wants: one key sort.
        key_E = np.concatenate([dst_E, np.arange(len(rows_R), dtype=np.int64)]) * len(sources_S)
        key_E += np.concatenate([np.searchsorted(sources_S, src_E), dst_pos_R])
        key_E.sort()
        local_dst, local_src = np.divmod(key_E, len(sources_S))
        plan.append(Edges.from_sorted(torch.from_numpy(local_src), torch.from_numpy(local_dst), len(rows_R),
                                      len(sources_S), torch.from_numpy(dst_pos_R)))
        rows_R = sources_S
    plan.reverse()
    return SampledGraph(torch.from_numpy(rows_R), plan, wanted)
