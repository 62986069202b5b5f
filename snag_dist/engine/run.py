"""A run is a folder: resolved config, metrics (JSONL + TensorBoard), checkpoints, plots, summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from snag_dist.config import Config, load_config, save_config
from snag_dist.engine.backend import build_backend
from snag_dist.engine.checkpoint import load_checkpoint, load_rank_files, load_task_state
from snag_dist.engine.dist import Collectives
from snag_dist.engine.loop import Trainer
from snag_dist.engine.memory import keep_freed_memory
from snag_dist.errors import CheckpointError
from snag_dist.logging import MetricsLogger
from snag_dist.tasks.registry import TASKS


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
          callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    """Train ``cfg`` into ``run_dir``; ``callbacks`` get ``{epoch, phase, <metrics>, checkpoint}`` on every
    rank after each validation (the checkpoint path is set when one was saved that epoch)."""
    run_dir = Path(run_dir)
    if cfg.engine.keep_freed_memory:
        keep_freed_memory()
    backend = build_backend(cfg.engine, cfg.train)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    # The one injection point of collectives into a task (tasks never import torch.distributed).
    comm = Collectives.current()
    task = TASKS.get(cfg.task.name)(cfg, backend.rank, backend.world_size, backend.device, comm=comm)
    if backend.is_main:
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, enabled=backend.is_main, resume=resume)
    try:
        state = Trainer(task, backend, cfg.train, cfg.eval, run_dir, logger, progress, callbacks).fit(resume)
    finally:
        logger.close()
    summary = {"best_epoch": state.best_epoch, "best_valid": state.best, "test": state.results}
    if backend.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        from snag_dist.plots import plot_run

        plot_run(run_dir)
    backend.barrier()
    return summary


def evaluate_run(run_dir: str | Path, splits: tuple[str, ...] = ("valid", "test"),
                 overrides: list[str] | None = None, checkpoint: str = "best") -> dict[str, dict[str, float]]:
    """Metrics of a run's checkpoint (``best`` by default). Under torchrun every process evaluates its share (the
    task's sharded protocols) and loads only its rows of a sharded table; all get the same result."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"), overrides)
    best = run_dir / "checkpoints" / checkpoint
    if not best.is_dir():
        raise CheckpointError(f"{best}: no such checkpoint (see {run_dir / 'checkpoints'})")
    model_state, _, _ = load_checkpoint(best)
    comm, device = _eval_collectives()
    task = TASKS.get(cfg.task.name)(cfg, comm.rank, comm.world_size, device, comm=comm)
    task.module.load_state_dict(model_state)
    table = getattr(task, "table", None)
    if table is not None:  # stream path: this rank's rows from the rank files that overlap them
        table.load_shards(load_rank_files(best, "table", rows=(table.start, table.stop), keys=("range", "weight")))
    if hasattr(task, "load_state_dict"):  # e.g. the pseudo links the best epoch trained with
        task.load_state_dict(load_task_state(best))
    out = {}
    for split in splits:
        start = time.perf_counter()
        metrics = task.evaluate(task.module, split)
        out[split] = {**metrics, **getattr(task, "eval_seconds", {}), "eval_seconds": time.perf_counter() - start}
    return out


def _eval_collectives() -> tuple[Collectives, torch.device]:
    """Collectives over a process group of torchrun's processes (none when run alone)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    comm = Collectives.current()
    device = torch.device("cuda", torch.cuda.current_device()) if comm.device.type == "cuda" else torch.device("cpu")
    return comm, device
