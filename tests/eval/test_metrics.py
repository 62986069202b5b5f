"""Rank statistics (eval/metrics.py): Hits@k, MRR and mean rank from ranks."""

from __future__ import annotations

import pytest
import torch

from snag_dist.eval.metrics import RankMetrics


def test_rank_metrics_from_ranks():
    metrics = RankMetrics.from_ranks(torch.tensor([1.0, 2.0, 10.0, 11.0]))
    assert metrics.hits == {1: 0.25, 10: 0.75}
    assert metrics.mrr == pytest.approx((1 + 0.5 + 0.1 + 1 / 11) / 4)
    assert metrics.mean_rank == pytest.approx(6.0)
    assert metrics.as_dict("r2l/")["r2l/hits@10"] == 0.75
