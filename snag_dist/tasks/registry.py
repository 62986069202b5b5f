"""Task name -> builder ``(cfg, rank, world_size, device) -> TrainTask``."""

from __future__ import annotations

from snag_dist.registry import Registry

TASKS: Registry = Registry("task")


@TASKS.register("alignment")
def _alignment(cfg, rank, world_size, device):
    from snag_dist.tasks.alignment import AlignmentTask

    return AlignmentTask(cfg, rank, world_size, device)


@TASKS.register("completion")
def _completion(cfg, rank, world_size, device):
    from snag_dist.tasks.completion import CompletionTask

    return CompletionTask(cfg, rank, world_size, device)
