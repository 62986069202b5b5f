"""Rank information and seeded generators (every random choice is seeded from seed, epoch, rank)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """torchrun / SLURM+torchrun / accelerate launch / deepspeed all export these."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


from snag_dist.seeding import generator  # noqa: E402,F401  (kept importable from here)


def global_rank() -> int:
    """This process's rank: the process group's when one is up (Ray Train), else torchrun's RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return RankInfo.from_env().rank


_PR_SET_PDEATHSIG = 1
_WATCHING: list[int] = []  # the parent pid a watchdog follows (set once per process)


def exit_with_launcher(poll_s: float = 0.5) -> bool:
    """A worker of torchrun (or any torch elastic agent) ends when its agent dies.

    The agent starts each worker in a session of its own, so a SIGKILLed agent would leave its
    workers training (and writing into the run folder) as orphans. On Linux the kernel sends this
    process SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); as the parent may have died before
    that call, a parent that is already gone (re-parented to init) ends the process now, and a
    watchdog thread polls the parent pid on every platform. No-op outside an elastic launch (a plain
    ``snag-dist train`` may be meant to outlive its shell). Returns whether it armed."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    if _WATCHING:
        return True
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog alone
            pass
    if os.getppid() != parent or (parent == 1 and not _init_is_launcher()):
        _orphaned(parent)
    _WATCHING.append(parent)
    threading.Thread(target=_watch, args=(parent, poll_s), name="snag-parent-watch", daemon=True).start()
    return True


def _init_is_launcher() -> bool:
    """Parent pid 1: the launcher itself as a container's init, or init that adopted an orphan."""
    try:
        cmdline = Path("/proc/1/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # cannot tell: do not end a run that may be fine
    return any(name in cmdline for name in (b"torch", b"accelerate", b"deepspeed"))


def _watch(parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            _orphaned(parent)


def _orphaned(parent: int) -> None:
    print(f"snag-dist: launcher (pid {parent}) is gone; worker {os.getpid()} exits", file=sys.stderr, flush=True)
    os._exit(1)


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``sizes[r]`` rows, concatenated in rank order (padded to the largest for the gather)."""
    import torch.distributed as dist

    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_r, ...) tensors along dim 0 with gradient: each rank's rows receive the sum
    of the gradients every rank computed for them (all-reduce + own slice; gloo has no reduce-scatter
    for autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


class Collectives:
    """What tasks may ask of the other processes (``tasks.base.Comm``): sums, row gathers (with
    gradient), all-to-all row exchange. Identity when there is one process, so a task runs the same
    code single- and multi-process. The engine hands it to the task (``task.attach``)."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 group=None) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")  # where the process group's tensors must live
        # The sharded table's exchanges run in the backward, next to DDP's asynchronous gradient
        # all-reduces: a group of their own keeps the two streams of collectives apart.
        self.group = group

    @classmethod
    def current(cls) -> Collectives:
        """Collectives over the default process group; every rank must call this at the same point
        (it creates the table-exchange group collectively)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            return cls(dist.get_rank(), dist.get_world_size(), device, group=dist.new_group())
        return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sizes(self, n: int, device: torch.device) -> list[int]:
        if not self.active:
            return [n]
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([n], dtype=torch.long, device=self.device))
        return [int(t.item()) for t in out]

    def gather_rows(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's rows (rank order); differentiable for floating tensors."""
        if not self.active:
            return x
        sizes = sizes or self.sizes(x.shape[0], x.device)
        if x.is_floating_point() and x.requires_grad:
            return _GatherRows.apply(x, sizes, self.rank)
        with torch.no_grad():
            return _all_gather_rows(x.to(self.device), sizes).to(x.device)

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        import torch.distributed as dist

        y = x.to(self.device, copy=True)
        dist.all_reduce(y)
        return y.to(x.device)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Rows of ``x`` cut by ``send_counts`` go to ranks 0..W-1; returns the received rows (rank
        order) and how many came from each rank. Not differentiable (callers route gradients back
        with a second exchange)."""
        if not self.active:
            return x, list(send_counts)
        import torch.distributed as dist

        counts = torch.tensor(send_counts, dtype=torch.long, device=self.device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv = [int(c) for c in recv_counts.tolist()]
        out = x.new_empty((sum(recv), *x.shape[1:]), device=self.device)
        dist.all_to_all_single(out, x.contiguous().to(self.device), recv, [int(c) for c in send_counts],
                               group=self.group)
        return out.to(x.device), recv
