"""Exact chunked CSLS ranking (eval/csls.py) against hand-computed numbers and a naive loop implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from snag_dist.eval.csls import (
    alignment_metrics,
    alignment_ranks,
    csls_hubness,
    csls_rank_metrics,
    csls_ranks,
)
from snag_dist.eval.neighbours import csls_topk
from snag_dist.eval.shards import QueryShard


def naive_csls(src: torch.Tensor, tgt: torch.Tensor, k: int) -> list[list[float]]:
    """CSLS written from the formula with Python loops, in float64 (the slow, obvious version)."""
    src = [row / row.norm() for row in src.double()]
    tgt = [row / row.norm() for row in tgt.double()]
    cos = [[float(x @ y) for y in tgt] for x in src]
    if k == 0:
        return cos
    r_tgt = [sum(sorted(row, reverse=True)[:k]) / min(k, len(row)) for row in cos]
    cols = [[cos[i][j] for i in range(len(src))] for j in range(len(tgt))]
    r_src = [sum(sorted(col, reverse=True)[:k]) / min(k, len(col)) for col in cols]
    return [[2 * cos[i][j] - r_tgt[i] - r_src[j] for j in range(len(tgt))] for i in range(len(src))]


def naive_ranks(src, tgt, gold, k) -> torch.Tensor:
    scores = naive_csls(src, tgt, k)
    ranks = []
    for i, row in enumerate(scores):
        g = int(gold[i])
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j != g and s > row[g]))
    return torch.tensor(ranks, dtype=torch.float64)


# Two sources and three targets in 2-D with exact cosines: src0 = (1, 0), src1 = (0, 1);
# tgt0 = (1, 0), tgt1 = (0.6, 0.8), tgt2 = (0, 1). cos = [[1, .6, 0], [0, .8, 1]].
SRC = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TGT = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])


def test_hand_computed_csls_k2():
    # k = 2: r_tgt = [(1 + .6)/2, (1 + .8)/2] = [.8, .9]; r_src = mean of both sources = [.5, .7, .5].
    hub = csls_hubness(SRC, TGT, k=2, chunk=1)
    assert hub.r_tgt_n.tolist() == pytest.approx([0.8, 0.9])
    assert hub.r_src_m.tolist() == pytest.approx([0.5, 0.7, 0.5])
    # csls = 2 cos - r_tgt - r_src: row 0 = [2-.8-.5, 1.2-.8-.7, 0-.8-.5] = [.7, -.3, -1.3],
    # row 1 = [0-.9-.5, 1.6-.9-.7, 2-.9-.5] = [-1.4, 0, .6].
    top = csls_topk(SRC, TGT, k=2, chunk=1, topn=3)
    assert top.indices.tolist() == [[0, 1, 2], [2, 1, 0]]
    expected = torch.tensor([[0.7, -0.3, -1.3], [0.6, 0.0, -1.4]])
    assert torch.allclose(top.values, expected, atol=1e-6)
    assert csls_ranks(SRC, TGT, torch.tensor([1, 1]), k=2, chunk=1).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 40, 41, 1000])
@pytest.mark.parametrize("k", [0, 3])
def test_chunked_ranks_equal_dense(chunk, k):
    gen = torch.Generator().manual_seed(chunk)
    src, tgt = torch.randn(41, 6, generator=gen), torch.randn(29, 6, generator=gen)
    gold = torch.randint(0, 29, (41,), generator=gen)
    got = csls_ranks(src, tgt, gold, k=k, chunk=chunk)
    assert torch.equal(got, naive_ranks(src, tgt, gold, k))


@pytest.mark.parametrize("shape", [(600, 300), (300, 600)])
def test_hubness_large_chunk_both_merge_paths(shape):
    """A 600-row chunk is merged in row blocks (256, then 344): the sparse merge on random rows,
    the dense fallback when every new row beats the running top-k (rows sorted ascending)."""
    n, m = shape
    gen = torch.Generator().manual_seed(n)
    src, tgt = torch.randn(n, 8, generator=gen), torch.randn(m, 8, generator=gen)
    for source in (src, src[(src @ tgt.mean(0)).argsort()]):
        hub = csls_hubness(source, tgt, k=3, chunk=600)
        cos = torch.nn.functional.normalize(source, dim=1) @ torch.nn.functional.normalize(tgt, dim=1).T
        assert torch.allclose(hub.r_src_m, cos.topk(3, dim=0).values.mean(0), atol=1e-6)
        assert torch.allclose(hub.r_tgt_n, cos.topk(3, dim=1).values.mean(1), atol=1e-6)


def _links_case(seed: int = 0, num_links: int = 37, dim: int = 6):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(2 * num_links + 5, dim, generator=gen)  # 5 entities outside the test links
    perm = torch.randperm(2 * num_links + 5, generator=gen)
    links = perm[: 2 * num_links].view(num_links, 2)
    return emb, links


@pytest.mark.parametrize("chunk", [4, 10, 37, 64])
def test_alignment_both_directions_equal_naive(chunk):
    emb, links = _links_case()
    got = alignment_ranks(emb, links, k=3, chunk=chunk)
    gold = torch.arange(links.shape[0])
    assert torch.equal(got.l2r, naive_ranks(emb[links[:, 0]], emb[links[:, 1]], gold, 3))
    assert torch.equal(got.r2l, naive_ranks(emb[links[:, 1]], emb[links[:, 0]], gold, 3))


def test_tie_rules():
    # Query e0; targets [e1, e0, e0, e0]: gold (index 1) ties with two other candidates.
    eye = torch.eye(3)
    src, tgt = eye[:1], torch.stack([eye[1], eye[0], eye[0], eye[0]])
    gold = torch.tensor([1])
    for k in (0, 1):  # identical columns also have identical hubness, so CSLS ties too
        assert csls_ranks(src, tgt, gold, k, chunk=2, ties="optimistic").item() == 1.0
        assert csls_ranks(src, tgt, gold, k, chunk=2, ties="pessimistic").item() == 3.0
        assert csls_ranks(src, tgt, gold, k, chunk=2, ties="realistic").item() == 2.0
    # A strictly better candidate counts under every rule.
    tgt2 = torch.stack([eye[0], eye[0] + 0.5 * eye[1], eye[1]])
    assert csls_ranks(src, tgt2, gold, 0, chunk=1, ties="realistic").item() == 2.0


def test_tie_rules_in_the_column_direction():
    # Left side has two copies of the same embedding: both right queries tie between them.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    links = torch.tensor([[0, 2], [1, 3]])
    optimistic = alignment_ranks(emb, links, k=0, chunk=1)
    realistic = alignment_ranks(emb, links, k=0, chunk=1, ties="realistic")
    assert optimistic.r2l.tolist() == [1.0, 1.0] and optimistic.l2r.tolist() == [1.0, 1.0]
    assert realistic.r2l.tolist() == [1.5, 1.5] and realistic.l2r.tolist() == [1.5, 1.5]


def test_k0_is_plain_cosine():
    gen = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(12, 5, generator=gen), torch.randn(12, 5, generator=gen)
    gold = torch.arange(12)
    cos = torch.nn.functional.normalize(src, dim=1) @ torch.nn.functional.normalize(tgt, dim=1).T
    expected = 1 + (cos > cos.diagonal().unsqueeze(1)).sum(1)
    assert torch.equal(csls_ranks(src, tgt, gold, k=0, chunk=5).long(), expected)


def test_alignment_metrics_keys_and_perfect_case():
    gen = torch.Generator().manual_seed(4)
    left = torch.randn(20, 8, generator=gen)
    emb = torch.cat([left, left + 0.01 * torch.randn(20, 8, generator=gen)])
    links = torch.stack([torch.arange(20), 20 + torch.arange(20)], dim=1)
    metrics = alignment_metrics(emb, links, k=3, chunk=6)
    assert set(metrics) == {
        "hits@1", "hits@10", "mrr", "mean_rank", "r2l/hits@1", "r2l/hits@10", "r2l/mrr", "r2l/mean_rank"
    }
    assert metrics["hits@1"] == 1.0 and metrics["r2l/mrr"] == 1.0
    single = csls_rank_metrics(emb[:20], emb[20:], torch.arange(20), k=3, chunk=7)
    assert single.hits[1] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        csls_ranks(SRC, TGT, torch.tensor([0, 1]), k=2, chunk=0)
    with pytest.raises(ValueError):
        QueryShard(2, 2)


def test_eval_layer_stays_process_free():
    """The engine reduces across ranks; ranking itself never imports distributed backends."""
    root = Path(__file__).resolve().parents[2] / "snag_dist" / "eval"
    for path in root.rglob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith(("torch.distributed", "accelerate", "deepspeed"))]
        assert ".cuda(" not in source


@pytest.mark.parametrize("keep", [1, 3, 6, 1000])
@pytest.mark.parametrize("ties", ["optimistic", "realistic"])
def test_kept_cosines_decide_or_recompute_exactly(monkeypatch, keep, ties):
    """Pass 1 keeps `keep` best cosines per row / column; undecided queries are recomputed: any keep is exact."""
    import snag_dist.eval.csls as csls

    monkeypatch.setattr(csls, "_KEEP", keep)
    emb, links = _links_case(seed=3, num_links=60, dim=4)
    emb = (emb * 2).round() / 2  # coarse values: exact ties between candidates
    monkeypatch.setattr(csls, "_KEEP", 1000)
    want = alignment_ranks(emb, links, k=3, chunk=7, ties=ties)
    monkeypatch.setattr(csls, "_KEEP", keep)
    got = alignment_ranks(emb, links, k=3, chunk=7, ties=ties)
    assert torch.equal(got.l2r, want.l2r) and torch.equal(got.r2l, want.r2l)
    assert want.l2r.max() > 5 and (want.l2r != want.l2r.round()).any() == (ties == "realistic")


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_grouped_top_lists_and_prefix_recount_are_exact(monkeypatch, ties):
    """Row top lists from the best column groups, column top lists screened by group maxima of
    rows (a chunk that is not a whole number of groups) and the penalty-prefix recount of the
    undecided queries: ranks equal the naive float64 CSLS and the keep-everything run."""
    import snag_dist.eval.csls as csls

    emb, links = _links_case(seed=5, num_links=150, dim=3)
    gold = torch.arange(links.shape[0])
    monkeypatch.setattr(csls, "_KEEP", 1000)
    want = alignment_ranks(emb, links, k=3, chunk=23, ties=ties)
    monkeypatch.setattr(csls, "_KEEP", 4)
    monkeypatch.setattr(csls, "_GROUP", 3)
    monkeypatch.setattr(csls, "_ROW_GROUP", 2)  # 150 columns >= 8 x 2 x 4: the grouped row path
    got = alignment_ranks(emb, links, k=3, chunk=23, ties=ties)
    assert torch.equal(got.l2r, want.l2r) and torch.equal(got.r2l, want.r2l)
    if ties == "optimistic":
        assert torch.equal(got.l2r, naive_ranks(emb[links[:, 0]], emb[links[:, 1]], gold, 3))
        assert torch.equal(got.r2l, naive_ranks(emb[links[:, 1]], emb[links[:, 0]], gold, 3))
    assert want.l2r.max() > 20  # many undecided queries (dim 3: the gold is often far down)
    hub = csls_hubness(emb[links[:, 0]], emb[links[:, 1]], k=3, chunk=23)
    cos = torch.nn.functional.normalize(emb[links[:, 0]], dim=1) @ torch.nn.functional.normalize(emb[links[:, 1]], dim=1).T
    assert torch.allclose(hub.r_src_m, cos.topk(3, dim=0).values.mean(0), atol=1e-6)
    assert torch.allclose(hub.r_tgt_n, cos.topk(3, dim=1).values.mean(1), atol=1e-6)
