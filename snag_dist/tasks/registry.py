"""Task name -> builder ``(cfg, rank, world_size, device, comm=None) -> TrainTask``.

``comm`` (``tasks.base.Comm``) is the one injection point of collectives: the engine passes its
``Collectives``; without it a task runs as one process."""

from __future__ import annotations

from snag_dist.registry import Registry

TASKS: Registry = Registry("task")


@TASKS.register("alignment")
def _alignment(cfg, rank, world_size, device, comm=None):
    from snag_dist.tasks.alignment import AlignmentTask

    return AlignmentTask(cfg, rank, world_size, device, comm=comm)


@TASKS.register("completion")
def _completion(cfg, rank, world_size, device, comm=None):
    from snag_dist.tasks.completion import CompletionTask

    return CompletionTask(cfg, rank, world_size, device, comm=comm)
