"""Task name -> builder ``(task, context, rank, world_size, device, comm=None) -> TrainTask``.

A builder takes the ``task`` section of the config (``TaskConfig``; the task keeps its own
sub-section) and the ``TaskContext`` the engine builds (``TaskContext.from_config``): a task never
sees the whole config. ``comm`` (``tasks.base.Comm``) is the one injection point of collectives: the
engine passes its ``Collectives``; without it a task runs as one process."""

from __future__ import annotations

from snag_dist.registry import Registry

TASKS: Registry = Registry("task")


@TASKS.register("alignment")
def _alignment(task, context, rank, world_size, device, comm=None):
    from snag_dist.tasks.alignment import AlignmentTask

    return AlignmentTask(task.alignment, context, rank, world_size, device, comm=comm)


@TASKS.register("completion")
def _completion(task, context, rank, world_size, device, comm=None):
    from snag_dist.tasks.completion import CompletionTask

    return CompletionTask(task.completion, context, rank, world_size, device, comm=comm)
