"""Task objectives and protocol (model output -> losses; embeddings -> metrics)."""

from snag_dist.tasks.alignment_losses import AlignmentLoss, UncertaintyWeighting, contrastive_loss
from snag_dist.tasks.base import LOSS_KEY, LossDict, Metrics, Task, check_losses

__all__ = [
    "LOSS_KEY", "AlignmentLoss", "LossDict", "Metrics", "Task", "UncertaintyWeighting",
    "check_losses", "contrastive_loss",
]
