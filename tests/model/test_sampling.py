"""Fan-out sampling of the GAT's neighbourhood: exactness at full fan-out, caps, purity, the graph store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from snag_dist.data.graph_store import GraphStore
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import ConfigError
from snag_dist.model import GAT
from snag_dist.model.sampling import SampledGraph, edge_hash, sample_subgraph

N, HIDDEN = 300, 16


def reference_csr(heads: np.ndarray, tails: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Undirected, de-duplicated adjacency without self-loops, rows sorted: the plain-Python way."""
    rows = [set() for _ in range(n)]
    for h, t in zip(heads.tolist(), tails.tolist(), strict=True):
        if h != t:
            rows[h].add(t)
            rows[t].add(h)
    indptr = np.cumsum([0] + [len(r) for r in rows])
    return indptr, np.array([v for r in rows for v in sorted(r)], dtype=np.int64)


@pytest.fixture(scope="module")
def graph():
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, N, (2, 1500), generator=gen)
    edge_index[:, 10] = edge_index[:, 3]  # a duplicate
    edge_index[:, 11] = edge_index[[1, 0], 3]  # the same edge reversed
    edge_index[:, 12] = 7  # a self edge
    indptr, indices = reference_csr(edge_index[0].numpy(), edge_index[1].numpy(), N)
    return edge_index, indptr, indices


def make_gat(seed: int = 0) -> GAT:
    torch.manual_seed(seed)
    gat = GAT(HIDDEN, layers=2, heads=2)
    with torch.no_grad():  # move off the ones-init so heads differ
        for layer in gat.layers:
            layer.w.uniform_(0.5, 1.5)
    return gat


def neighbour_sets(sampled: SampledGraph) -> list[dict[int, frozenset[int]]]:
    """Per layer: global destination id -> the global ids of its sampled sources (self-loop included)."""
    out, sources = [], sampled.nodes
    for edges in sampled.plan:
        dst_global = sources[edges.dst_pos]
        layer = {}
        for d, s in zip(dst_global[edges.dst].tolist(), sources[edges.src].tolist(), strict=True):
            layer.setdefault(d, set()).add(s)
        out.append({d: frozenset(s) for d, s in layer.items()})
        sources = dst_global
    return out


def test_full_fanout_equals_the_whole_graph_forward_and_gradients(graph):
    edge_index, indptr, indices = graph
    targets = torch.tensor([41, 3, 3, 17, 299, 0, 41, 150, 7])
    sampled = sample_subgraph(indptr, indices, targets, [-1, -1], seed=0)
    assert torch.equal(sampled.targets, torch.unique(targets))
    # Exactly the blocks GAT.forward's restricted path builds.
    full_edges = make_gat()._edges(edge_index, N)
    rows, receptive = sampled.targets, []
    for _ in range(2):
        sub, rows = full_edges.receptive(rows)
        receptive.append(sub)
    assert torch.equal(rows, sampled.nodes)
    for got, want in zip(sampled.plan, reversed(receptive), strict=True):
        assert (got.num_dst, got.num_src) == (want.num_dst, want.num_src)
        for name in ("src", "dst", "crow", "col", "perm_t", "crow_t", "col_t", "dst_pos"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name

    weights = torch.randn(len(sampled.targets), HIDDEN)
    results = []
    for use_sampled in (False, True):
        gat = make_gat()
        x = torch.randn(N, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = gat.forward_sampled(x[sampled.nodes], sampled) if use_sampled else gat(x, edge_index)[sampled.targets]
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, *(p.grad for p in gat.parameters())))
    (full_out, *full_grads), (part_out, *part_grads) = results
    assert torch.allclose(part_out, full_out, atol=1e-5)
    assert torch.equal(sampled.targets[sampled.index(targets)], targets)
    for full, part in zip(full_grads, part_grads, strict=True):
        assert torch.allclose(part, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()))


def test_fanout_caps_non_self_edges_and_keeps_self_loops(graph):
    _, indptr, indices = graph
    targets = torch.arange(0, N, 7)
    sampled = sample_subgraph(indptr, indices, targets, [3, 3], seed=5)
    degree = np.diff(indptr)
    capped = 0
    for layer in neighbour_sets(sampled):
        for d, sources in layer.items():
            assert d in sources
            assert 1 <= len(sources) - 1 <= min(3, degree[d])  # draws with replacement may repeat
            if degree[d] <= 3:
                assert len(sources) - 1 == degree[d]
            assert sources - {d} <= set(indices[indptr[d]:indptr[d + 1]].tolist())
            capped += degree[d] > 3
    assert capped > 0
    gat = make_gat()
    out = gat.forward_sampled(torch.randn(len(sampled.nodes), HIDDEN), sampled)
    assert out.shape == (len(targets), HIDDEN)


def test_sampling_is_a_pure_function_of_seed_layer_and_edge(graph):
    _, indptr, indices = graph
    targets = torch.tensor([5, 80, 123, 200, 201, 17, 5])
    big = sample_subgraph(indptr, indices, targets, [3, 2], seed=11)
    again = sample_subgraph(indptr, indices, targets.flip(0), [3, 2], seed=11)
    assert torch.equal(big.nodes, again.nodes)
    for a, b in zip(big.plan, again.plan, strict=True):
        assert torch.equal(a.src, b.src) and torch.equal(a.dst, b.dst)
    big_sets = neighbour_sets(big)
    for t in targets.unique().tolist():
        alone = neighbour_sets(sample_subgraph(indptr, indices, torch.tensor([t]), [3, 2], seed=11))
        for layer_alone, layer_big in zip(alone, big_sets, strict=True):
            for d, sources in layer_alone.items():
                assert layer_big[d] == sources
    other = neighbour_sets(sample_subgraph(indptr, indices, targets, [3, 2], seed=12))
    assert other[1] != big_sets[1]


def test_kept_neighbours_are_the_hashed_csr_positions(graph):
    _, indptr, indices = graph
    fanouts, seed = [2, 1], 3
    sampled = sample_subgraph(indptr, indices, torch.arange(0, N, 11), fanouts, seed)
    for layer, (fanout, kept) in enumerate(zip(fanouts, neighbour_sets(sampled), strict=True)):
        for d, sources in kept.items():
            nbrs = indices[indptr[d]:indptr[d + 1]]
            if len(nbrs) <= fanout:
                want = set(nbrs.tolist())
            else:  # position j: hash(seed, layer, d, j) mod degree
                hashes = edge_hash(seed, layer, np.full(fanout, d), np.arange(fanout))
                want = {int(nbrs[int(h % np.uint64(len(nbrs)))]) for h in hashes}
            assert sources == {d} | want


@pytest.mark.parametrize("fanouts", [[0, 3], [3, -2]])
def test_bad_fanout_is_a_config_error(graph, fanouts):
    _, indptr, indices = graph
    with pytest.raises(ConfigError, match="model.gat_fanout"):
        sample_subgraph(indptr, indices, torch.tensor([1]), fanouts, seed=0)


def test_graph_store_matches_a_reference_adjacency_and_caches(align_dir, tmp_path):
    src, truth = align_dir
    shards = tmp_path / "shards"
    prepare(src, shards, PrepareOptions(min_shards=3, block_size=64, relation_topk=0), show_progress=False)
    store = GraphStore.open(shards)
    triples = read_all_rows(shards, "triples/train")
    indptr, indices = reference_csr(triples[:, 0], triples[:, 2], truth["n"])
    assert store.num_nodes == truth["n"] and store.indices.dtype == np.int32
    assert isinstance(store.indptr, np.memmap) and store.indptr.dtype == np.int64
    assert np.array_equal(store.indptr, indptr) and np.array_equal(store.indices, indices)
    assert np.array_equal(store.degree([0, 5, 5]), np.diff(indptr)[[0, 5, 5]])
    # Sampling reads the memmapped int32 CSR as it is.
    sampled = sample_subgraph(store.indptr, store.indices, torch.tensor([0, 41]), [2, -1], seed=0)
    assert set(neighbour_sets(sampled)[1][0]) == {0, *indices[indptr[0]:indptr[1]].tolist()}

    stamp = store.path / "graph.json"
    built = (store.path / "indices.npy").stat().st_mtime_ns
    assert (GraphStore.open(shards).path / "indices.npy").stat().st_mtime_ns == built  # cached
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "manifest_sha256": "stale"}))
    rebuilt = GraphStore.open(shards)
    assert json.loads(stamp.read_text())["manifest_sha256"] != "stale"
    assert np.array_equal(rebuilt.indices, indices)
