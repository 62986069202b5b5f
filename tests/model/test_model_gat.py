"""The diagonal GAT: edge handling, locality, subgraphs, gradients."""

from __future__ import annotations

import pytest
import torch

from snag_dist.errors import DataError
from snag_dist.model import GAT, undirected_edges
from snag_dist.model.gat import edge_softmax
from tests.model.model_helpers import random_edges

H = 8


def make_gat(seed: int = 0, layers: int = 2) -> GAT:
    torch.manual_seed(seed)
    gat = GAT(H, layers=layers, heads=2)
    with torch.no_grad():  # move off the ones-init so heads differ
        for layer in gat.layers:
            layer.w.uniform_(0.5, 1.5)
    return gat


def test_undirected_edges_symmetric_deduplicated_with_self_loops():
    edges = torch.tensor([[0, 1, 0, 2, 2], [1, 0, 1, 2, 0]])  # 0-1 three times, a self-loop, 2->0
    src, dst = undirected_edges(edges, num_nodes=4)
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert pairs == {(0, 1), (1, 0), (0, 2), (2, 0), (0, 0), (1, 1), (2, 2), (3, 3)}
    assert len(pairs) == src.numel()


def test_edge_softmax_sums_to_one_per_destination():
    dst = torch.tensor([0, 0, 1, 2, 2, 2])
    alpha = edge_softmax(torch.randn(6, 3) * 10, dst, num_nodes=3)
    sums = torch.zeros(3, 3).index_add_(0, dst, alpha)
    assert torch.allclose(sums, torch.ones(3, 3))


def test_out_of_range_edges_rejected():
    with pytest.raises(DataError, match="local ids"):
        make_gat()(torch.randn(3, H), torch.tensor([[0], [3]]))


def test_outputs_depend_only_on_the_neighbourhood():
    # path 0-1-2-3-4, node 5 isolated; 2 layers see 2 hops
    edges = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    gat = make_gat()
    x = torch.randn(6, H)
    base = gat(x, edges)
    y = x.clone()
    y[:5] = torch.randn(5, H)  # change everything but the isolated node
    assert torch.allclose(gat(y, edges)[5], base[5])
    z = x.clone()
    z[4] = torch.randn(H)  # 3 hops from node 1, 2 hops from node 2
    out = gat(z, edges)
    assert torch.allclose(out[:2], base[:2]) and not torch.allclose(out[2], base[2])


def test_subgraph_gives_the_full_graph_result_for_its_centre():
    n = 40
    edges = random_edges(n, 50, seed=3)
    gat = make_gat()
    x = torch.randn(n, H)
    full = gat(x, edges)
    src, dst = undirected_edges(edges, n)
    centre = int(dst[src != dst][0])
    hop1 = set(src[dst == centre].tolist())
    keep = sorted(hop1 | set(src[torch.isin(dst, torch.tensor(sorted(hop1)))].tolist()))  # 2-hop closure
    assert len(keep) < n
    local = torch.full((n,), -1, dtype=torch.long)
    local[keep] = torch.arange(len(keep))
    inside = (local[edges[0]] >= 0) & (local[edges[1]] >= 0)
    sub = gat(x[keep], local[edges[:, inside]])
    assert torch.allclose(sub[local[centre]], full[centre], atol=1e-6)


def test_gradients_reach_every_parameter_and_input():
    gat = make_gat()
    x = torch.randn(10, H, requires_grad=True)
    (gat(x, random_edges(10, 20)) * torch.randn(10, H)).sum().backward()
    for name, p in gat.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_sparse_aggregation_matches_dense_gradients():
    """The custom sparse head-mean product's forward and all three gradients equal a dense reference."""
    from snag_dist.model.gat import Edges, Scratch, _HeadMeanSpMM

    torch.manual_seed(0)
    n, heads = 9, 2
    edge_index = torch.randint(0, n, (2, 20))
    edges = Edges.build(edge_index, n)
    alpha = torch.rand(edges.src.shape[0], heads, dtype=torch.double, requires_grad=True)
    g = torch.randn(n, 4, dtype=torch.double, requires_grad=True)
    w = torch.rand(heads, 4, dtype=torch.double, requires_grad=True)
    scratch = Scratch()
    assert torch.autograd.gradcheck(lambda a, x, v: _HeadMeanSpMM.apply(a, x, v, edges, scratch), (alpha, g, w))
    dense = [torch.zeros(n, n, dtype=torch.double).index_put((edges.dst, edges.src), alpha[:, k]) for k in range(heads)]
    want = sum((dense[k] @ g) * w[k] for k in range(heads)) / heads
    assert torch.allclose(_HeadMeanSpMM.apply(alpha, g, w, edges, scratch), want)
    # Only the inputs that need a gradient get one.
    got = torch.autograd.grad(_HeadMeanSpMM.apply(alpha.detach(), g, w.detach(), edges, scratch).sum(), g)[0]
    assert torch.allclose(got, torch.autograd.grad(want.sum(), g)[0])


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_receptive_field_equals_the_whole_graph_then_selecting(layers):
    """GAT(x, edges, out_index) computes only the rows each layer needs; outputs and every gradient
    equal running the whole graph and selecting (repeated and unsorted out ids included)."""
    from snag_dist.model.gat import GAT

    torch.manual_seed(layers)
    n, hidden = 60, 8
    edge_index = random_edges(n, 90, seed=layers)
    out_index = torch.tensor([41, 3, 3, 17, 59, 0, 41])
    weights = torch.randn(len(out_index), hidden)
    grads = []
    for restricted in (False, True):
        torch.manual_seed(0)
        gat = GAT(hidden, layers=layers, heads=2)
        x = torch.randn(n, hidden, requires_grad=True)
        out = gat(x, edge_index, out_index=out_index) if restricted else gat(x, edge_index)[out_index]
        (out * weights).sum().backward()
        grads.append((out.detach(), x.grad, *(p.grad for p in gat.parameters())))
    for full, part in zip(*grads):
        assert torch.allclose(full, part, atol=1e-6)
    assert grads[1][1].abs().sum(1).ne(0).sum() < n  # rows outside the receptive field get no gradient
    many = torch.arange(n).flip(0)  # above restrict_below: the whole graph, then selected
    assert torch.allclose(gat(x, edge_index, out_index=many), gat(x, edge_index)[many])


def test_rectangular_block_aggregation_gradcheck():
    from snag_dist.model.gat import Edges, Scratch, _HeadMeanSpMM

    torch.manual_seed(1)
    n, heads = 12, 2
    full = Edges.build(torch.randint(0, n, (2, 25)), n)
    sub, sources = full.receptive(torch.tensor([2, 7, 11]))
    assert sub.num_dst == 3 and sub.num_src == len(sources) and set(sources.tolist()) >= {2, 7, 11}
    alpha = torch.rand(sub.src.shape[0], heads, dtype=torch.double, requires_grad=True)
    g = torch.randn(sub.num_src, 4, dtype=torch.double, requires_grad=True)
    w = torch.rand(heads, 4, dtype=torch.double, requires_grad=True)
    scratch = Scratch()
    assert torch.autograd.gradcheck(lambda a, x, v: _HeadMeanSpMM.apply(a, x, v, sub, scratch), (alpha, g, w))
