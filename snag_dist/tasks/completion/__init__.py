"""Multi-modal KG completion (MKGC) with SNAG: RotatE on the fused entity representation.

One module per job:

* ``rotate.py``: RotatE (relation rotations, training scores), the distances and their compiled /
  eager kernels, ``RotatEScorer`` (ranking every entity at evaluation);
* ``negatives.py``: ``CompletionBatch``, the Bernoulli head probability, ``NegativeSampler``
  (corruptions, chunked negatives, filters, self negatives) and the stream path's triple indexes;
* ``module.py``: ``CompletionModule`` (SNAG + readout projection + RotatE) and the self-adversarial loss;
* ``task.py``: ``CompletionTask`` (batches on the full and stream paths, schedule, filtered evaluation).
"""

from snag_dist.tasks.completion.module import CompletionModule, self_adversarial_loss
from snag_dist.tasks.completion.negatives import (
    CompletionBatch,
    NegativeSampler,
    head_probability,
    triple_index,
)
from snag_dist.tasks.completion.rotate import DistanceKernel, RotatE, RotatEScorer
from snag_dist.tasks.completion.task import CompletionTask

__all__ = [
    "CompletionBatch", "CompletionModule", "CompletionTask", "DistanceKernel", "NegativeSampler", "RotatE",
    "RotatEScorer", "head_probability", "self_adversarial_loss", "triple_index",
]
