"""The learned per-entity rows (the structure embedding) sharded by rows over processes.

Rank r owns the contiguous id range ``partition_range(N, r, W)`` and that range's optimizer state;
nothing N-sized exists on any rank. ``rows(ids)`` fetches any rows with gradient: the ids go to
their owners and the rows come back (two all-to-all exchanges); in the backward the rows' gradients
go back to their owners (one more) and land in the owner's weight as a sparse gradient, which
``torch.optim.SparseAdam`` applies to the touched rows only (lazy Adam, no weight decay). No rank
ever all-reduces the table. Gradients are divided by the world size, the data-parallel mean that
DDP / ZeRO apply to the dense weights, so W processes train what one process trains on the same
global batch.

Why hand-written: torchrec's row-wise sharding needs fbgemm's CPU kernels built for our exact torch,
and its DistributedModelParallel would wrap the whole model, fighting Accelerate DDP / DeepSpeed ZeRO
for the dense weights; DTensor's Shard(0) embedding expects the same ids on every rank (replicated
input). This is ~100 lines over the engine's all-to-all (see the README's "sharded entity table").

Rows start as N(0, std) from generators keyed by blocks of 65,536 ids, so the initial table is the
same for any world size. Collectives come in through ``comm`` (``tasks.base.Comm``); every rank must
call ``rows`` the same number of times in the same order (one call per training step).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from snag_dist.data.store import partition_range
from snag_dist.seeding import stable_seed, torch_generator

_INIT_BLOCK = 1 << 16


def keyed_normal_rows(seed: int, start: int, stop: int, dim: int, std: float) -> torch.Tensor:
    """Rows [start, stop) of an (N, dim) N(0, std) table whose values do not depend on how it is cut."""
    out = torch.empty(stop - start, dim)
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1 if stop > start else 0):
        lo = block * _INIT_BLOCK
        gen = torch_generator(stable_seed("table", seed, block))
        values = torch.randn(_INIT_BLOCK, dim, generator=gen) * std
        a, b = max(start, lo), min(stop, lo + _INIT_BLOCK)
        out[a - start:b - start] = values[a - lo:b - lo]
    return out


_LOADED_LATER = False


@contextmanager
def rows_loaded_later() -> Iterator[None]:
    """Tables built inside start uninitialised: a checkpoint fills them (``snag-dist eval``). The N/W x dim
    random draw is never written, so its pages never count in the resident set (at 1M entities and one
    process, 1 GiB of the evaluation's peak)."""
    global _LOADED_LATER
    before, _LOADED_LATER = _LOADED_LATER, True
    try:
        yield
    finally:
        _LOADED_LATER = before


class _FetchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids_U: torch.Tensor, table: ShardedTable) -> torch.Tensor:
        comm = table.comm
        counts = torch.bincount(table.owner(ids_U), minlength=comm.world_size).tolist()
        asked, asked_counts = comm.all_to_all(ids_U, counts)  # ids others want from me
        local = asked - table.start
        rows, _ = comm.all_to_all(weight.detach()[local], asked_counts)
        ctx.table, ctx.local, ctx.counts, ctx.asked_counts = table, local, counts, asked_counts
        return rows

    @staticmethod
    def backward(ctx, grad_UH: torch.Tensor):
        table = ctx.table
        grads, _ = table.comm.all_to_all(grad_UH.contiguous(), ctx.counts)  # back to the owner (me)
        grads = grads.to(table.weight.dtype) / table.comm.world_size
        sparse = torch.sparse_coo_tensor(ctx.local[None], grads, table.weight.shape, check_invariants=False)
        return sparse, None, None


class ShardedTable:
    """This rank's rows of an (N, dim) table and their SparseAdam state."""

    def __init__(self, num_rows: int, dim: int, comm, seed: int, std: float, lr: float,
                 device: torch.device | None = None) -> None:
        self.comm, self.num_rows, self.dim = comm, num_rows, dim
        self.start, self.stop = partition_range(num_rows, comm.rank, comm.world_size)
        device = device or torch.device("cpu")
        starts = [partition_range(num_rows, r, comm.world_size)[0] for r in range(comm.world_size)]
        self.starts = torch.tensor(starts, dtype=torch.long, device=device)
        rows = (torch.empty(self.stop - self.start, dim) if _LOADED_LATER else
                keyed_normal_rows(seed, self.start, self.stop, dim, std))
        self.weight = nn.Parameter(rows.to(device))
        self.base_lr = lr
        self.optimizer = torch.optim.SparseAdam([self.weight], lr=lr)

    def use_mapped(self, rows: np.ndarray) -> None:
        """Read this rank's rows from a memory map (evaluation of a checkpoint, CPU): no copy of the
        rows is held, and ``release`` drops the pages read so far from the resident set."""
        if rows.shape != tuple(self.weight.shape):
            raise ValueError(f"mapped rows {rows.shape} do not fit this rank's table {tuple(self.weight.shape)}")
        self.weight.data = torch.from_numpy(rows)
        self._mapped = rows

    def release(self) -> None:
        """MADV_DONTNEED on a mapped weight (see ``use_mapped``): the pages stay in the OS page cache but
        stop counting in this process's RSS; a later read faults them back in. No-op otherwise."""
        mapped = getattr(getattr(self, "_mapped", None), "_mmap", None)
        if mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.starts, ids.to(self.starts.device), right=True) - 1

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), dim) rows of any ids (with gradient when the table trains)."""
        uniq, inverse = torch.unique(ids.to(self.starts.device), return_inverse=True)  # sorted: owners contiguous
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.num_rows):
            raise IndexError(f"entity id outside [0, {self.num_rows})")
        if torch.is_grad_enabled():
            fetched = _FetchRows.apply(self.weight, uniq, self)
        else:
            with torch.no_grad():
                fetched = _FetchRows.forward(_NoCtx(), self.weight, uniq, self)
        return fetched[inverse]

    def step(self, lr_factor: float = 1.0) -> None:
        """Apply the accumulated sparse gradient (lr = base lr x the schedule's factor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_factor
        if self.weight.grad is not None:
            self.weight.grad = self.weight.grad.coalesce()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and (unbiased) std over all N rows, summed over the ranks."""
        w = self.weight
        sums = torch.zeros(2 * self.dim + 1, dtype=torch.float64, device=w.device)
        for a in range(0, len(w), _INIT_BLOCK):  # float64 by blocks: never a second copy of the table
            block = w[a:a + _INIT_BLOCK].double()
            sums[: self.dim] += block.sum(0)
            sums[self.dim: 2 * self.dim] += (block * block).sum(0)
        sums[-1] = len(w)
        sums = self.comm.reduce_sum(sums)
        n = sums[-1]
        mean = sums[: self.dim] / n
        var = (sums[self.dim: 2 * self.dim] - n * mean * mean) / (n - 1).clamp_min(1.0)
        return mean.float(), var.clamp_min(0.0).sqrt().float()

    # -- checkpoints: every rank saves its range; any world size can load (ranges are re-cut) ---
    def state_dict(self, with_optim: bool = True) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight.detach(), "range": torch.tensor([self.start, self.stop])}
        slots = self.optimizer.state.get(self.weight, {})
        if with_optim and slots:
            state.update({"exp_avg": slots["exp_avg"], "exp_avg_sq": slots["exp_avg_sq"],
                          "step": torch.tensor([int(slots["step"])], dtype=torch.long)})
        return state

    def state_chunks(self, with_optim: bool = True, max_bytes: int = 128 << 20) -> list[dict[str, torch.Tensor]]:
        """``state_dict`` cut into row ranges of at most ~``max_bytes`` (views, no copies): a checkpoint
        writes them one file each, so saving never holds a second copy of the whole table."""
        state = self.state_dict(with_optim)
        per_row = sum(v.shape[1] * v.element_size() for k, v in state.items() if k not in ("range", "step"))
        rows = max(1, max_bytes // max(1, per_row))
        chunks = []
        for a in range(0, max(1, self.stop - self.start), rows):
            b = min(a + rows, self.stop - self.start)
            chunk = {k: v[a:b] for k, v in state.items() if k not in ("range", "step")}
            chunk["range"] = torch.tensor([self.start + a, self.start + b])
            if "step" in state:
                chunk["step"] = state["step"]
            chunks.append(chunk)
        return chunks

    def load_shards(self, shards: list[dict[str, torch.Tensor]]) -> None:
        """Load this rank's range from saved ranges of any number of ranks: all of them (they tile
        [0, N)) or just contiguous ones covering this rank's rows."""
        shards = sorted(shards, key=lambda s: int(s["range"][0]))
        cover = [(int(s["range"][0]), int(s["range"][1])) for s in shards]
        if not cover or cover[0][0] > self.start or cover[-1][1] < self.stop or cover[-1][1] > self.num_rows or any(
                a[1] != b[0] for a, b in zip(cover, cover[1:])):
            raise ValueError(f"saved table ranges {cover} do not cover rows [{self.start}, {self.stop}) of "
                             f"[0, {self.num_rows}) contiguously")

        def cut(key: str) -> torch.Tensor:
            parts = []
            for s, (a, b) in zip(shards, cover):
                lo, hi = max(a, self.start), min(b, self.stop)
                if lo < hi:
                    parts.append(s[key][lo - a:hi - a])
            return torch.cat(parts).to(self.weight.device)

        with torch.no_grad():
            self.weight.copy_(cut("weight"))
        if all("exp_avg" in s for s in shards):
            step = int(shards[0]["step"].reshape(()))  # SparseAdam keeps a Python int (bias corrections)
            self.optimizer.state[self.weight] = {"step": step, "exp_avg": cut("exp_avg"),
                                                 "exp_avg_sq": cut("exp_avg_sq")}


class _NoCtx:
    """Stands in for autograd's ctx when rows are fetched without gradient."""
