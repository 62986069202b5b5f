"""cut_batches / concat_rows: blocks of any sizes -> batches of exactly `size` rows, in order, copied once."""

from __future__ import annotations

import numpy as np
import pytest

from snag_dist.data.batching import concat_rows, cut_batches


@pytest.mark.parametrize("size", [1, 4, 7, 100])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_are_the_rows_in_order_cut_to_size(size, drop_last):
    ends = np.cumsum([0, *np.random.default_rng(size).integers(0, 9, 12)])  # block sizes 0..8
    blocks = [np.arange(a, b).reshape(-1, 1) * [1, 10] for a, b in zip(ends[:-1], ends[1:])]
    rows = np.concatenate(blocks)
    batches = [concat_rows(p) for p in cut_batches(iter(blocks), size, drop_last)]
    assert all(len(b) == size for b in batches[:-1])
    full, rest = divmod(len(rows), size)
    assert len(batches) == full + (rest > 0 and not drop_last)
    got = np.concatenate(batches) if batches else rows[:0]
    assert np.array_equal(got, rows[: len(got)])
    assert len(got) == (full * size if drop_last else len(rows))


def test_pieces_name_row_ranges_and_batches_are_fresh_copies():
    a, b = np.arange(5), np.arange(5, 8)
    cuts = list(cut_batches([a, np.zeros(0, int), b], 4))
    assert [[(blk is a, s, e) for blk, s, e in p] for p in cuts] == [[(True, 0, 4)], [(True, 4, 5), (False, 0, 3)]]
    one = concat_rows(cuts[0])  # a single piece is copied too: a view would pin the whole block
    assert one.tolist() == [0, 1, 2, 3] and not np.shares_memory(one, a)
    assert concat_rows(cuts[1]).tolist() == [4, 5, 6, 7]
    assert list(cut_batches([], 3)) == []


def test_lazy():
    def blocks():
        yield np.arange(3)
        raise AssertionError("read past the first batch")

    assert concat_rows(next(cut_batches(blocks(), 2))).tolist() == [0, 1]
