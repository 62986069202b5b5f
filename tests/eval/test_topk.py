"""faiss top-k alignment protocol: with K = N it is exact CSLS; truncation; a missing faiss is one line."""

from __future__ import annotations

import sys

import pytest
import torch

from snag_dist.errors import ConfigError
from snag_dist.eval.csls import alignment_ranks
from snag_dist.eval.neighbours import mutual_nearest_pairs
from snag_dist.eval.topk import IndexSpec, knn, topk_alignment_ranks, topk_mutual_pairs

pytest.importorskip("faiss")


def _case(n: int = 60, dim: int = 12, noise: float = 0.8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, dim, generator=gen)
    tgt = src + noise * torch.randn(n, dim, generator=gen)  # link i: (src i, tgt i), many mistakes
    return src, tgt


@pytest.mark.parametrize("spec", [IndexSpec("flat"), IndexSpec("ivf", lists=4, probe=4),
                                  IndexSpec("ivf_sq8", lists=4, probe=4), IndexSpec("hnsw", ef=200)])
@pytest.mark.parametrize("k_csls", [0, 3])
def test_topk_with_k_equal_n_is_exact_csls(spec, k_csls):
    src, tgt = _case()
    n = len(src)
    exact = alignment_ranks(torch.cat([src, tgt]), torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1),
                            k_csls, chunk=16)
    got = topk_alignment_ranks(src, tgt, k_csls, n, spec)
    assert exact.l2r.max() > 5  # not a trivial case
    assert torch.equal(got.l2r, exact.l2r) and torch.equal(got.r2l, exact.r2l)


def test_truncation_counts_a_gold_outside_the_candidates_as_a_miss():
    src, tgt = _case(noise=2.0)
    n = len(src)
    exact = alignment_ranks(torch.cat([src, tgt]), torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1),
                            0, chunk=16)
    got = topk_alignment_ranks(src, tgt, 0, 5, IndexSpec("flat"))
    within = exact.l2r <= 5
    assert within.any() and (~within).any()
    assert torch.equal(got.l2r[within], exact.l2r[within])  # k_csls = 0: cosine ranks, exact within K
    assert torch.isinf(got.l2r[~within]).all()


def test_knn_finds_the_true_neighbours_and_orders_them():
    src, tgt = _case(noise=0.05)
    top = knn(src, tgt, 3, IndexSpec("flat"))
    assert top.ids[:, 0].tolist() == list(range(len(src)))
    assert (top.cos[:, :-1] >= top.cos[:, 1:]).all()
    over = knn(src[:2], tgt[:2], 4, IndexSpec("flat"))  # K above the base size: -1 / -inf padding
    assert (over.ids[:, 2:] == -1).all() and torch.isinf(over.cos[:, 2:]).all()


@pytest.mark.parametrize("k_csls", [0, 3])
def test_topk_mutual_pairs_equal_exact_with_k_equal_n(k_csls):
    src, tgt = _case(noise=0.6, seed=3)
    n = len(src)
    emb = torch.cat([src, tgt])
    left, right = torch.arange(n), torch.arange(n, 2 * n)
    exact = mutual_nearest_pairs(emb, left, right, k_csls, chunk=8)
    got = topk_mutual_pairs(src, tgt, left, right, k_csls, n, IndexSpec("flat"))
    assert len(exact) > 5
    assert {tuple(p) for p in got.tolist()} == {tuple(p) for p in exact.tolist()}


def test_k_below_the_csls_neighbourhood_is_a_config_error():
    src, tgt = _case()
    with pytest.raises(ConfigError, match="csls_k"):
        topk_alignment_ranks(src, tgt, 10, 5, IndexSpec("flat"))


def test_missing_faiss_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    src, tgt = _case()
    with pytest.raises(ConfigError, match="faiss-cpu") as err:
        topk_alignment_ranks(src, tgt, 3, 10, IndexSpec("ivf"))
    assert "\n" not in str(err.value)


def test_ivf_sq8_scans_codes_but_returns_exact_cosines():
    """8-bit codes only route and pre-rank; the kept candidates carry their exact float32 cosines."""
    src, tgt = _case(noise=0.8, seed=5)
    got = knn(src, tgt, 5, IndexSpec("ivf_sq8", lists=2, probe=1))
    src_n, tgt_n = torch.nn.functional.normalize(src, dim=1), torch.nn.functional.normalize(tgt, dim=1)
    found = got.ids >= 0
    want = (src_n[:, None, :] * tgt_n[got.ids.clamp_min(0)]).sum(-1)
    assert found.float().mean() > 0.9
    assert torch.allclose(got.cos[found], want[found], atol=2e-6)
    assert (got.cos[:, :-1] >= got.cos[:, 1:]).all()
