"""Filtered ranking over blocks of entity vectors (the stream path's evaluation) against `eval.filtered`,
and the sampled-candidate protocol against a per-query loop."""

from __future__ import annotations

import pytest
import torch

from snag_dist.eval.filtered import KnownTriples, filtered_ranks
from snag_dist.eval.filtered_sharded import (
    SAMPLE_GROUP,
    full_filtered_ranks,
    sampled_candidates,
    sampled_filtered_ranks,
)


def _graph(n: int = 53, r: int = 4, dim: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(n, dim, generator=gen)
    rel = torch.randn(r, dim, generator=gen)
    triples = torch.stack([torch.randint(0, n, (300,), generator=gen), torch.randint(0, r, (300,), generator=gen),
                           torch.randint(0, n, (300,), generator=gen)], 1)
    # rounded scores: many exact ties, so the tie rules matter
    def block_score(anchor, rel_c, predict_head, cand):
        q = anchor * (rel[rel_c] if not predict_head else -rel[rel_c])
        return -torch.cdist(q, cand, p=1).mul(2).round()

    def score_fn(anchor_ids, rel_c, predict_head):
        return block_score(vec[anchor_ids], rel_c, predict_head, vec)

    return vec, triples, KnownTriples(triples, n, r), block_score, score_fn


@pytest.mark.parametrize("ties", ["optimistic", "realistic", "pessimistic"])
@pytest.mark.parametrize("chunk,block", [(7, 5), (64, 53), (13, 200)])
def test_rounds_of_candidate_blocks_equal_the_whole_table(ties, chunk, block):
    vec, triples, known, block_score, score_fn = _graph()
    queries = triples[:60]
    want = filtered_ranks(score_fn, queries, known, 16, ties)
    got = full_filtered_ranks(block_score, vec, queries, known, chunk, block, ties=ties)
    assert torch.equal(got.head, want.head) and torch.equal(got.tail, want.tail)
    assert want.tail.max() > 5
    if ties == "realistic":
        assert (want.tail != want.tail.round()).any()  # ties happen (x.5 ranks)


def test_sampled_protocol_equals_a_per_query_loop():
    vec, triples, known, block_score, _ = _graph(seed=1)
    queries, k, seed = triples[:150], 20, 7
    got = sampled_filtered_ranks(block_score, vec, queries, 0, known, k, seed)
    for direction in ("head", "tail"):
        ph = direction == "head"
        ranks = getattr(got, direction)
        for i, (h, r, t) in enumerate(queries.tolist()):
            cand = sampled_candidates(seed, i // SAMPLE_GROUP, k, len(vec))
            anchor, target = (t, h) if ph else (h, t)
            s = block_score(vec[[anchor]], torch.tensor([r]), ph, vec)[0]
            keep = [int(c) for c in cand if int(c) != target and not known.contains(
                torch.tensor(int(c) if ph else h), torch.tensor(r), torch.tensor(t if ph else int(c)))]
            greater = sum(1 for c in keep if s[c] > s[target])
            equal = sum(1 for c in keep if s[c] == s[target])
            assert ranks[i].item() == 1 + greater + equal / 2, (direction, i)


def test_sampled_draw_does_not_depend_on_where_a_rank_starts():
    vec, triples, known, block_score, _ = _graph(seed=2)
    whole = sampled_filtered_ranks(block_score, vec, triples[:200], 0, known, 15, 3)
    parts = [sampled_filtered_ranks(block_score, vec, triples[a:b], a, known, 15, 3) for a, b in ((0, 70), (70, 200))]
    assert torch.equal(torch.cat([p.tail for p in parts]), whole.tail)
    assert torch.equal(torch.cat([p.head for p in parts]), whole.head)
    assert sampled_candidates(3, 0, 15, 53).unique().numel() > 5


def test_vectors_in_a_file_rank_as_in_memory(tmp_path):
    """eval.spill_mib: the rank's vectors written to a file and read back per round / by id."""
    from snag_dist.eval.filtered_sharded import FileRows

    vec, triples, known, block_score, _ = _graph(seed=3)
    rows = FileRows.write(tmp_path / "v.f32", [vec[:10], vec[10:40], vec[40:]], vec.shape[1], vec.device)
    assert len(rows) == len(vec) and torch.equal(rows.rows(5, 45), vec[5:45]) and len(rows.rows(50, 70)) == 3
    assert torch.equal(rows.take(torch.tensor([52, 0, 7, 7])), vec[[52, 0, 7, 7]])
    for got, want in ((full_filtered_ranks(block_score, rows, triples[:80], known, 9, 11),
                       full_filtered_ranks(block_score, vec, triples[:80], known, 9, 11)),
                      (sampled_filtered_ranks(block_score, rows, triples[:80], 0, known, 12, 1),
                       sampled_filtered_ranks(block_score, vec, triples[:80], 0, known, 12, 1))):
        assert torch.equal(got.head, want.head) and torch.equal(got.tail, want.tail)
