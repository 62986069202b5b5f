"""Filtered head/tail ranking against hand-computed ranks (with ties) and a naive per-query loop."""

from __future__ import annotations

import pytest
import torch

from snag_dist.eval.filtered import (
    KnownTriples,
    chunk_ranks,
    filtered_metrics,
    filtered_rank_stats,
    filtered_ranks,
    metrics_from_stats,
)
from snag_dist.eval.shards import QueryShard

# Hand-made graph: 5 entities, 2 relations.
TRAIN = [(0, 0, 1), (0, 0, 2), (3, 1, 4)]
VALID = [(1, 0, 2)]
TEST = [(0, 0, 3), (2, 1, 4)]
# Scores of every entity 0..4 as the missing one, per (anchor, relation, predict_head).
TABLE = {
    (0, 0, False): [5.0, 9.0, 7.0, 6.0, 6.0],  # (0, 0, ?) target 3
    (3, 0, True): [2.0, 8.0, 2.0, 2.0, 1.0],  # (?, 0, 3) target 0
    (2, 1, False): [0.0, 0.0, 0.0, 0.0, 0.0],  # (2, 1, ?) target 4
    (4, 1, True): [1.0, 3.0, 4.0, 9.0, 3.0],  # (?, 1, 4) target 2
}


def table_scores(anchor: torch.Tensor, rel: torch.Tensor, predict_head: bool) -> torch.Tensor:
    return torch.tensor([TABLE[(int(a), int(r), predict_head)] for a, r in zip(anchor, rel)])


def hand_known() -> KnownTriples:
    return KnownTriples(torch.tensor(TRAIN + VALID + TEST), num_entities=5, num_relations=2)


# Worked out by hand (g = greater, q = other entities with an equal score, after filtering):
#   tail (0,0,?)->3: 1 and 2 are known tails of (0, 0) and filtered; 0 scores 5 < 6; 4 ties at 6.
#                    g=0, q=1 -> optimistic 1, pessimistic 2, realistic 1.5
#   head (?,0,3)->0: no other known head; 1 scores 8 > 2; 2 and 3 tie at 2; 4 scores 1.
#                    g=1, q=2 -> 2, 4, 3
#   tail (2,1,?)->4: all five score 0: g=0, q=4 -> 1, 5, 3 (= (N + 1) / 2)
#   head (?,1,4)->2: 3 is a known head of (1, 4) and filtered (its 9 would win); 1 and 4 score 3 < 4.
#                    g=0, q=0 -> 1, 1, 1
HAND = {
    "optimistic": {"tail": [1.0, 1.0], "head": [2.0, 1.0]},
    "pessimistic": {"tail": [2.0, 5.0], "head": [4.0, 1.0]},
    "realistic": {"tail": [1.5, 3.0], "head": [3.0, 1.0]},
}


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "realistic"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_hand_computed_ranks(ties, chunk):
    ranks = filtered_ranks(table_scores, torch.tensor(TEST), hand_known(), chunk, ties)
    assert ranks.tail.tolist() == HAND[ties]["tail"]
    assert ranks.head.tolist() == HAND[ties]["head"]


def test_hand_computed_metrics():
    m = filtered_metrics(table_scores, torch.tensor(TEST), hand_known(), chunk=3)
    # realistic ranks 1.5, 3 (tail) and 3, 1 (head)
    assert m["mrr"] == pytest.approx((1 / 1.5 + 1 / 3 + 1 / 3 + 1) / 4)
    assert m["hits@1"] == pytest.approx(0.25)
    assert m["hits@3"] == pytest.approx(1.0)
    assert m["hits@10"] == pytest.approx(1.0)
    assert m["mean_rank"] == pytest.approx(2.125)
    assert m["tail/mrr"] == pytest.approx((1 / 1.5 + 1 / 3) / 2)
    assert m["head/hits@1"] == pytest.approx(0.5)


def test_unfiltered_known_changes_ranks():
    """Train-only filter: every filtered answer above is a train triple, so ranks stay; no filter: they drop."""
    known = KnownTriples(torch.tensor(TRAIN), num_entities=5, num_relations=2)
    ranks = filtered_ranks(table_scores, torch.tensor(TEST), known, 4)
    assert ranks.tail.tolist() == [1.5, 3.0]  # 1 and 2 are train tails of (0, 0)
    # (?, 1, 4): 3 is a train head of (1, 4) -> filtered either way
    assert ranks.head.tolist() == [3.0, 1.0]
    nothing = KnownTriples(torch.zeros(0, 3, dtype=torch.long), num_entities=5, num_relations=2)
    raw = filtered_ranks(table_scores, torch.tensor(TEST), nothing, 4)
    assert raw.tail.tolist() == [3.5, 3.0]  # 1 (9) and 2 (7) beat 6 now
    assert raw.head.tolist() == [3.0, 2.0]  # 3 (9) beats 4 now


def test_target_outside_known_set_is_not_counted_against_itself():
    scores = torch.tensor([[1.0, 2.0, 2.0]])
    empty = torch.zeros(0, dtype=torch.long)
    assert chunk_ranks(scores, torch.tensor([1]), empty, empty, "realistic").tolist() == [1.5]


def test_nan_target_score_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        chunk_ranks(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long), "realistic")


# -- chunked == dense on a random problem ------------------------------------------------------
N, R = 37, 4


def random_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    known = torch.stack([torch.randint(0, N, (300,), generator=g), torch.randint(0, R, (300,), generator=g),
                         torch.randint(0, N, (300,), generator=g)], 1)
    queries = known[torch.randperm(300, generator=g)[:41]]
    # Rounded scores: plenty of ties.
    tables = {d: (torch.randn(R, N, N, generator=g) * 2).round() for d in (False, True)}

    def score_fn(anchor, rel, predict_head):
        return tables[predict_head][rel, anchor].clone()

    return known, queries, tables, score_fn


def naive_ranks(known, queries, tables, ties):
    """Per-query Python loops over sets: the obvious implementation."""
    facts = {tuple(t) for t in known.tolist()}
    out = {"head": [], "tail": []}
    for h, r, t in queries.tolist():
        for direction, anchor, target in (("tail", h, t), ("head", t, h)):
            predict_head = direction == "head"
            row = tables[predict_head][r, anchor].tolist()
            greater = equal = 0
            for e in range(N):
                fact = (e, r, t) if predict_head else (h, r, e)
                if e == target or fact in facts:
                    continue
                greater += row[e] > row[target]
                equal += row[e] == row[target]
            tie = {"optimistic": 0.0, "pessimistic": equal, "realistic": equal / 2}[ties]
            out[direction].append(1.0 + greater + tie)
    return out


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "realistic"])
def test_chunked_equals_dense(ties):
    known, queries, tables, score_fn = random_problem()
    index = KnownTriples(known, N, R)
    want = naive_ranks(known, queries, tables, ties)
    for chunk in (1, 3, 7, 16, 41, 1000):
        got = filtered_ranks(score_fn, queries, index, chunk, ties)
        assert got.tail.tolist() == want["tail"], chunk
        assert got.head.tolist() == want["head"], chunk


def test_shards_add_up_to_the_whole():
    known, queries, _, score_fn = random_problem(1)
    index = KnownTriples(known, N, R)
    whole = filtered_rank_stats(score_fn, queries, index, 5)
    parts = [filtered_rank_stats(score_fn, queries, index, 5, shard=QueryShard(i, 3)) for i in range(3)]
    summed = {k: sum(p[k] for p in parts) for k in whole}
    for key in whole:
        assert torch.allclose(summed[key], whole[key])
    assert metrics_from_stats(summed) == pytest.approx(metrics_from_stats(whole))
    # A stand-in for an all-reduce: rank 0's sums plus the other ranks' (keys come head, then tail).
    others = iter([parts[1]["head"] + parts[2]["head"], parts[1]["tail"] + parts[2]["tail"]])
    reduced = filtered_metrics(score_fn, queries, index, 5, shard=QueryShard(0, 3), reduce_sum=lambda t: t + next(others))
    assert reduced == pytest.approx(metrics_from_stats(whole))


def test_known_triples_lookups_match_sets():
    known, queries, _, _ = random_problem(2)
    index = KnownTriples(known, N, R)
    facts = {tuple(t) for t in known.tolist()}
    anchors, rels = queries[:, 0], queries[:, 1]
    rows, cols = index.answers(anchors, rels, predict_head=False)
    got = {(int(i), int(e)) for i, e in zip(rows, cols)}
    want = {(i, e) for i, (h, r) in enumerate(zip(anchors.tolist(), rels.tolist())) for e in range(N) if (h, r, e) in facts}
    assert got == want and len(rows) == len(want)
    cand = torch.randint(0, N, (len(queries), 9), generator=torch.Generator().manual_seed(0))
    hit = index.contains(cand, rels[:, None], anchors[:, None])  # (cand, r, anchor) for every candidate
    for i, (a, r) in enumerate(zip(anchors.tolist(), rels.tolist())):
        for k, e in enumerate(cand[i].tolist()):
            assert bool(hit[i, k]) == ((e, r, a) in facts)
    assert index.contains(queries[:, 0], queries[:, 1], queries[:, 2]).all()


def test_known_triples_rejects_bad_ids():
    with pytest.raises(ValueError, match="outside"):
        KnownTriples(torch.tensor([[0, 5, 1]]), num_entities=3, num_relations=2)


def test_score_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        filtered_ranks(lambda a, r, h: torch.zeros(len(a), 4), torch.tensor(TEST), hand_known(), 2)


def test_one_pass_realistic_ranks_equal_the_two_count_path():
    """The realistic one-pass sign sum equals greater + equal / 2 counted the slow way (ties, filtered
    entries, +-inf scores), and a NaN candidate score is an error there."""
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(50, 200, generator=g) * 2).round()
    scores[0, 5], scores[1, 7] = float("inf"), -float("inf")
    target = torch.randint(0, 200, (50,), generator=g)
    rows, cols = torch.randint(0, 50, (300,), generator=g), torch.randint(0, 200, (300,), generator=g)
    keep = cols != target[rows]
    rows, cols = rows[keep], cols[keep]
    fast = chunk_ranks(scores.clone(), target, rows, cols, "realistic")
    slow = chunk_ranks(scores.clone(), target, rows, cols, "optimistic") + 0.5 * (
        chunk_ranks(scores.clone(), target, rows, cols, "pessimistic") - chunk_ranks(scores.clone(), target, rows, cols, "optimistic"))
    assert torch.equal(fast, slow)
    bad = scores.clone()
    bad[3, (target[3] + 1) % 200] = float("nan")
    with pytest.raises(ValueError, match="NaN for a candidate"):
        chunk_ranks(bad, target, rows[rows != 3], cols[rows != 3], "realistic")
