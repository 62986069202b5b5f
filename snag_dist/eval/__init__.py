"""Evaluation independent of model and training: chunked CSLS ranking."""

from snag_dist.eval.ranking import (
    AlignmentRanks,
    Hubness,
    QueryShard,
    RankMetrics,
    Ties,
    TopK,
    alignment_metrics,
    alignment_ranks,
    csls_hubness,
    csls_rank_metrics,
    csls_ranks,
    csls_topk,
    mutual_nearest_pairs,
    rank_stats,
)

__all__ = [
    "AlignmentRanks", "Hubness", "QueryShard", "RankMetrics", "Ties", "TopK", "alignment_metrics",
    "alignment_ranks", "csls_hubness", "csls_rank_metrics", "csls_ranks", "csls_topk",
    "mutual_nearest_pairs", "rank_stats",
]
