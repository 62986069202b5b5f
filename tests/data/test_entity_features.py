"""The relation bag is a records.Csr (one CSR type for bags, in prepare and in the shards)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from snag_dist.data.entity_features import Moments, relation_bag
from snag_dist.data.records import Csr


def test_relation_bag_rows_are_a_csr_of_top_relation_counts():
    tri = np.array([[0, 2, 1], [0, 2, 3], [1, 0, 0], [3, 1, 2], [3, 2, 3], [2, 5, 0]])  # triples per relation: 2 x3, 0/1/5 x1
    ds = SimpleNamespace(num_entities=5, num_relations=6)
    bag = relation_bag(ds, topk=3, triples=lambda split: iter([tri[:4], tri[4:]]))
    assert isinstance(bag.rows, Csr) and bag.dim == 3
    dense = np.zeros((5, bag.dim), np.float32)
    bag.rows.scatter_into(dense)
    ref = np.zeros((5, 6), np.float32)  # per entity: how often it is head or tail of each relation
    for h, r, t in tri:
        ref[h, r] += 1
        ref[t, r] += 1
    assert np.array_equal(dense, ref[:, [2, 0, 1]])  # top 3 by count (ties by id); relation 5 dropped
    part = bag.rows.slice(1, 4)  # what EntityFeatures.chunk hands prepare for entities [1, 4)
    assert part.indptr[0] == 0 and np.array_equal(np.diff(part.indptr), np.diff(bag.rows.indptr)[1:4])
    mom = Moments(bag.dim)
    mom.add_bag(part)
    assert mom.n == int((np.diff(part.indptr) > 0).sum()) == 3
    assert np.allclose(mom.s, ref[1:4][:, [2, 0, 1]].sum(0))
