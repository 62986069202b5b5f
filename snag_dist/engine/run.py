"""A run is a folder: resolved config, metrics (JSONL + TensorBoard), checkpoints, plots, summary."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from snag_dist.config import Config, load_config, save_config
from snag_dist.config.changes import RESUME_HINT, check_eval, check_resume, refusal
from snag_dist.config.schema import STANDARD_MODALITIES
from snag_dist.engine.backend import build_backend
from snag_dist.engine.checkpoint import (
    checkpoint_dir,
    latest,
    load_checkpoint,
    load_task_state,
    map_rank_rows,
    read_rank_rows,
    recover,
    tags,
)
from snag_dist.engine.dist import Collectives, exit_with_launcher, global_rank
from snag_dist.engine.loop import Trainer
from snag_dist.engine.memory import keep_freed_memory
from snag_dist.errors import CheckpointError, ConfigError, DataError
from snag_dist.logging import MetricsLogger
from snag_dist.model.sharded_table import rows_loaded_later
from snag_dist.seeding import seed_torch
from snag_dist.tasks.base import Comm, TaskContext, TrainTask
from snag_dist.tasks.registry import TASKS


def build_task(cfg: Config, rank: int, world_size: int, device: torch.device, comm: Comm | None = None) -> TrainTask:
    """The task ``cfg.task.name`` names, given its own config section and the ``TaskContext`` of ``cfg``
    (data, model, GMNM and the train/eval fields it reads): a task never sees the whole config."""
    return TASKS.get(cfg.task.name)(cfg.task, TaskContext.from_config(cfg), rank, world_size, device, comm=comm)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
          callbacks: Sequence[Callable[[dict], None]] = (), overwrite: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir``; ``callbacks`` get ``{epoch, phase, <metrics>, checkpoint}`` on every
    rank after each validation (the checkpoint path is set when one was saved that epoch).

    Rank 0 holds ``RUN/.lock`` for the whole run (a second run into the folder is refused). A folder
    with checkpoints needs ``resume`` (continue: the stored config is compared with ``cfg``, see
    ``config.changes``) or ``overwrite`` (its checkpoints, metrics and plots are deleted first)."""
    run_dir = Path(run_dir)
    exit_with_launcher()  # a torchrun worker never outlives its agent (no orphan keeps writing here)
    if resume and overwrite:
        raise ConfigError("--resume auto and --overwrite exclude each other (continue the run, or start it over)")
    _check_run_dir(run_dir)
    _check_modalities(cfg)
    lock = RunLock(run_dir) if global_rank() == 0 else None
    try:
        return _train_locked(cfg, run_dir, resume, progress, callbacks, overwrite)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: Config, run_dir: Path, resume: bool, progress: bool,
                  callbacks: Sequence[Callable[[dict], None]], overwrite: bool) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    if global_rank() == 0:
        recover(ckpt_dir)  # a kill between the renames of a checkpoint replacement
    last = latest(ckpt_dir) if resume else None
    if not resume and not overwrite and tags(ckpt_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints ({', '.join(tags(ckpt_dir))}): pass "
                              "--resume auto to continue that run or --overwrite to delete it and start over")
    if last is None and global_rank() == 0:
        # A fresh start (also --resume auto with no epoch checkpoint to continue): nothing of an earlier
        # attempt (a `best`, metrics, TensorBoard events, plots) may mix into this run's.
        _clear_run(run_dir)
    changes = _resume_changes(run_dir, cfg) if last is not None else []
    if cfg.engine.keep_freed_memory:
        keep_freed_memory()
    backend = build_backend(cfg.engine, cfg.train)
    seed_torch(cfg.train.seed)  # identical initial weights on every rank
    # The one injection point of collectives into a task (tasks never import torch.distributed).
    comm = Collectives.current()
    task = build_task(cfg, backend.rank, backend.world_size, backend.device, comm=comm)
    _check_eval_splits(task, cfg)
    if last is not None:
        _check_extension(task, changes, last, cfg.train)
    if backend.is_main:
        save_config(cfg, run_dir / "config.yaml")
        if changes:
            _record_changes(run_dir, changes, last)
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


# -- the run folder -----------------------------------------------------------------------------
LOCK = ".lock"
CHANGES = "resume_changes.jsonl"  # one record per resume that applied config changes


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` (the holder's pid and host written in it): the kernel
    releases it when the holder exits or is killed, so a stale lock file never blocks a run."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl
        import socket

        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(self.fd)
                raise CheckpointError(f"cannot lock run folder {run_dir} ({exc.strerror}; a filesystem "
                                      "without file locks?)") from None
            holder = os.pread(self.fd, 256, 0).decode(errors="replace").split()
            os.close(self.fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise CheckpointError(f"run folder {run_dir} is in use by another run (pid {pid} on host {host}); "
                                  "wait for it to end, or train into another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        import fcntl

        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file, not a run folder")
    for parent in run_dir.parents:  # a file where a parent folder should be
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"--out {run_dir}: {parent} is a file, not a folder")
            break


# Everything a run writes (config.yaml and the lock stay: the first is rewritten, the second is held).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "train.jsonl", "summary.json", "plots", "tb", CHANGES)


def _clear_run(run_dir: Path) -> None:
    """--overwrite: delete a run's outputs. Each is renamed aside first (atomic), so a kill halfway
    never leaves a partial checkpoint folder a later resume would take for the run's."""
    aside = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.exists():
            target = run_dir / f".{name}.deleted-{os.getpid()}"
            os.replace(path, target)
            aside.append(target)
    for stale in run_dir.glob(".*.deleted-*"):  # this one's, and those of an overwrite that was killed
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _check_modalities(cfg: Config) -> None:
    """``model.modalities`` names: structure, a modality of the data, or a standard one the data lacks
    (skipped, as the schema documents); anything else (a typo, ``video``) is an error naming the known ones."""
    from snag_dist.data.manifest import load_manifest

    if not cfg.data.shards or not (Path(cfg.data.shards) / "manifest.json").is_file():
        return  # the task reports missing shards
    try:
        have = list(load_manifest(cfg.data.shards).modalities)
    except DataError:
        return
    known = ["structure", *have]
    unknown = [m for m in cfg.model.modalities if m not in known and m not in STANDARD_MODALITIES]
    if unknown:
        raise ConfigError(f"model.modalities: unknown modality '{unknown[0]}' (the data in {cfg.data.shards} "
                          f"has: {', '.join(known)})")


def _check_eval_splits(task, cfg: Config) -> None:
    """Splits the run will evaluate exist before the first epoch trains (not after it)."""
    rows = getattr(task, "links", None)
    kind = "links"
    if not isinstance(rows, dict):
        rows, kind = getattr(task, "triples", None), "triples"
    if not isinstance(rows, dict):
        return
    need = []
    if cfg.train.eval_every > 0:
        need.append((cfg.eval.split, f"train.eval_every={cfg.train.eval_every} selects epochs on it "
                                     f"(eval.split={cfg.eval.split}; train.eval_every=0 trains without selection)"))
    if cfg.eval.test_at_end:
        need.append(("test", "eval.test_at_end=true tests the best weights on it"))
    for split, why in need:
        if split in rows and len(rows[split]) == 0:
            extra = (" not in train (task.completion.dedupe_valid)"
                     if kind == "triples" and split == "valid" and cfg.task.completion.dedupe_valid else "")
            raise DataError(f"{cfg.data.shards}: no '{split}' {kind}{extra} to evaluate on: {why}")


# -- resume with a config ------------------------------------------------------------------------


def _resume_changes(run_dir: Path, cfg: Config) -> list[tuple[str, Any, Any]]:
    """The stored config (``config.yaml``) against ``cfg``: refused keys raise before anything is written."""
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        return []
    try:
        stored = load_config(str(stored_path))
    except ConfigError as exc:
        raise CheckpointError(f"cannot resume {run_dir}: its config.yaml does not load ({exc})") from None
    return check_resume(stored, cfg)


def _finished_refusal(fit: dict, train) -> str | None:
    """Why a finished run cannot go on to a raised ``train.epochs`` exactly as if it had been started with
    it (None: it can). Its last checkpoint is written after the test evaluation, on the best weights; it
    continues the run only when those are the last epoch's, and the lr of every step must not depend on
    the run's length (a constant lr without warm-up)."""
    epochs, best = fit.get("epoch"), fit.get("best_epoch")
    if train.lr_schedule != "constant" or train.warmup_ratio > 0:
        return (f"the run finished ({epochs} epochs) and its lr schedule depends on the run's length "
                f"({train.lr_schedule}, warm-up ratio {train.warmup_ratio}); train a new run with more epochs")
    if train.max_steps and fit.get("global_step", 0) >= train.max_steps:
        return f"the run stopped at train.max_steps ({train.max_steps}); train a new run with more epochs"
    if best is None or best != epochs - 1:
        return (f"the run finished ({epochs} epochs) with its best validation at epoch {best}, not the last "
                f"({epochs - 1}): its last checkpoint holds the best weights, so it cannot continue the last "
                "ones; train a new run with more epochs")
    return None


def _check_extension(task, changes: list[tuple[str, Any, Any]], last: Path, train) -> None:
    """A raised ``train.epochs`` is applied only when only the last phase grows, and to a finished run only
    when it continues it exactly (``_finished_refusal``)."""
    epochs = next(((a, b) for key, a, b in changes if key == "train.epochs"), None)
    if epochs is None:
        return
    old, new = (task.phases(n) for n in epochs)
    try:
        fit = json.loads((last / "state.json").read_text()).get("fit", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {last} is corrupt: {exc}") from None
    if [(p.name, p.epochs) for p in old[:-1]] != [(p.name, p.epochs) for p in new[:-1]] or len(old) != len(new):
        why = "it changes the task's training phases"
    elif fit.get("phase", 0) >= len(old):
        why = _finished_refusal(fit, train)
    else:
        why = None
    if why is None:
        return
    raise refusal("--resume auto", "train.epochs", epochs[0], epochs[1], why, RESUME_HINT)


def _record_changes(run_dir: Path, changes: list[tuple[str, Any, Any]], last: Path) -> None:
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checkpoint": last.name,
              "changes": {key: {"stored": a, "requested": b} for key, a, b in changes}}
    with open(run_dir / CHANGES, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def evaluate_run(run_dir: str | Path, splits: tuple[str, ...] = ("valid", "test"),
                 overrides: list[str] | None = None, checkpoint: str = "best") -> dict[str, dict[str, float]]:
    """Metrics of a run's checkpoint (``best`` by default). Under torchrun every process evaluates its share (the
    task's sharded protocols) and loads only its rows of a sharded table; all get the same result."""
    run_dir = Path(run_dir)
    exit_with_launcher()
    cfg = run_config(run_dir, overrides)
    best = find_checkpoint(run_dir, checkpoint)
    model_state, _, _ = load_checkpoint(best)
    comm, device = _eval_collectives()
    with rows_loaded_later():  # the sharded table's rows come from the checkpoint below
        task = build_task(cfg, comm.rank, comm.world_size, device, comm=comm)
    load_model_state(task.module, model_state, best)
    table = getattr(task, "table", None)
    with tempfile.TemporaryDirectory(prefix="snag-eval-") as tmp:
        if table is not None:  # stream path: this rank's rows from the rank files that overlap them
            if device.type == "cpu" and table.stop > table.start:  # read from the checkpoint file, not held
                table.use_mapped(map_rank_rows(best, "table", (table.start, table.stop), Path(tmp)))
            else:
                with torch.no_grad():
                    read_rank_rows(best, "table", (table.start, table.stop), table.weight)
        if hasattr(task, "load_state_dict"):  # e.g. the pseudo links the best epoch trained with
            task.load_state_dict(load_task_state(best))
        out = {}
        for split in splits:
            start = time.perf_counter()
            metrics = task.evaluate(task.module, split)
            out[split] = {**metrics, **getattr(task, "eval_seconds", {}), "eval_seconds": time.perf_counter() - start}
    return out


def run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """A run's stored config with ``overrides`` that leave its model as trained (``config.changes``)."""
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"), overrides)
    if overrides:
        check_eval(load_config(str(run_dir / "config.yaml")), cfg)
    return cfg


def find_checkpoint(run_dir: Path, tag: str) -> Path:
    """``RUN/checkpoints/<tag>`` (or its aside copy while a replacement was interrupted), else a one-line
    error listing what the run has."""
    folder = run_dir / "checkpoints"
    if "/" in tag or tag.startswith("."):
        raise CheckpointError(f"--checkpoint {tag!r}: a checkpoint name under {folder} (e.g. best, epoch_3)")
    path = checkpoint_dir(folder, tag)
    if not path.is_dir():
        have = tags(folder)
        listing = f"it has: {', '.join(have)}" if have else "it has none: the run ended before its first checkpoint"
        raise CheckpointError(f"{run_dir}: no checkpoint '{tag}' ({listing})")
    return path


def load_model_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict`` whose mismatch (a config that is not the checkpoint's) is one line."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc)[:200])
        raise CheckpointError(f"checkpoint {path} does not fit the run's config (the config.yaml beside it "
                              f"was changed?): {detail}") from None


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
