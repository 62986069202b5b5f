"""Multi-modal KG completion (MKGC) with SNAG: RotatE on the fused entity representation."""

from snag_dist.tasks.completion.task import (
    CompletionBatch,
    CompletionModule,
    CompletionTask,
    DistanceKernel,
    RotatE,
    RotatEScorer,
    head_probability,
    self_adversarial_loss,
    set_structure_noise_stats,
    triple_index,
)

__all__ = [
    "CompletionBatch", "CompletionModule", "CompletionTask", "DistanceKernel", "RotatE", "RotatEScorer",
    "head_probability", "self_adversarial_loss", "set_structure_noise_stats", "triple_index",
]
