"""Evaluation independent of model and training.

metrics.py     rank statistics and result types (Hits@k, MRR, mean rank; tie rules)
shards.py      which block of queries a process ranks; the collectives the engine injects
csls.py        exact chunked CSLS ranking for alignment (two passes, both directions)
neighbours.py  mutual nearest pairs and top-n targets by exact CSLS
topk.py        approximate alignment ranking and pseudo links with faiss (large N)
filtered.py    filtered head / tail ranking for KG completion
filtered_sharded.py  the same with the entity vectors split over ranks
"""

from snag_dist.eval.csls import (
    Hubness,
    alignment_metrics,
    alignment_ranks,
    csls_hubness,
    csls_rank_metrics,
    csls_ranks,
)
from snag_dist.eval.metrics import AlignmentRanks, RankMetrics, Ties, rank_stats
from snag_dist.eval.neighbours import TopK, csls_topk, mutual_nearest_pairs
from snag_dist.eval.shards import QueryShard

__all__ = [
    "AlignmentRanks", "Hubness", "QueryShard", "RankMetrics", "Ties", "TopK", "alignment_metrics",
    "alignment_ranks", "csls_hubness", "csls_rank_metrics", "csls_ranks", "csls_topk",
    "mutual_nearest_pairs", "rank_stats",
]
