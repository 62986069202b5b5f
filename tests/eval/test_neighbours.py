"""Nearest neighbours by exact CSLS (eval/neighbours.py): top-n targets and mutual nearest pairs
against hand-computed numbers and the naive CSLS of test_csls."""

from __future__ import annotations

import pytest
import torch

from snag_dist.eval.neighbours import csls_topk, mutual_nearest_pairs
from tests.eval.test_csls import SRC, TGT, naive_csls


def test_hand_computed_csls_k1_changes_the_winner():
    # k = 1: r_tgt = [1, 1], r_src = [1, .8, 1]; row 0 = [0, -.6, -2], row 1 = [-2, -.2, 0].
    top = csls_topk(SRC, TGT, k=1, chunk=2, topn=3)
    assert torch.allclose(top.values, torch.tensor([[0.0, -0.6, -2.0], [0.0, -0.2, -2.0]]), atol=1e-6)
    naive = naive_csls(SRC, TGT, 1)
    assert naive[1] == pytest.approx([-2.0, -0.2, 0.0])


@pytest.mark.parametrize("k", [0, 1, 3, 50])
def test_topk_matches_naive_loops(k):
    gen = torch.Generator().manual_seed(k)
    src, tgt = torch.randn(9, 4, generator=gen), torch.randn(11, 4, generator=gen)
    top = csls_topk(src, tgt, k=k, chunk=4, topn=11)
    naive = torch.tensor(naive_csls(src, tgt, k), dtype=torch.float64)
    expected = naive.sort(dim=1, descending=True).values
    assert torch.allclose(top.values.double(), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 16, 100])
@pytest.mark.parametrize("k", [0, 3])
def test_mutual_nearest_pairs_recovers_true_pairs(chunk, k):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(30, 16, generator=gen)
    perm = torch.randperm(30, generator=gen)
    # Entities 0..29 are left, 30..59 right; right entity 30 + perm[i] is a noisy copy of left i.
    emb = torch.empty(60, 16)
    emb[:30] = base
    emb[30 + perm] = base + 0.05 * torch.randn(30, 16, generator=gen)
    left_ids = torch.arange(30).flip(0)  # any order of candidates
    right_ids = 30 + torch.arange(30)
    pairs = mutual_nearest_pairs(emb, left_ids, right_ids, k=k, chunk=chunk)
    got = {tuple(p) for p in pairs.tolist()}
    assert got == {(i, 30 + int(perm[i])) for i in range(30)}


def test_mutual_nearest_pairs_drops_non_mutual():
    # Left a and b both prefer right x; x prefers a, so only (a, x) is mutual.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [-1.0, 0.2]])
    pairs = mutual_nearest_pairs(emb, torch.tensor([0, 1]), torch.tensor([2, 3]), k=0, chunk=1)
    assert pairs.tolist() == [[0, 2]]
    empty = mutual_nearest_pairs(emb, torch.tensor([], dtype=torch.long), torch.tensor([2]), k=0, chunk=1)
    assert empty.shape == (0, 2)
