"""Seconds per epoch, test-evaluation time and peak RSS of the paper configuration on DBP15K FR-EN.

Run on an otherwise idle machine: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_alignment_speed.py`
(argument: model.modalities, default [structure,relation]; needs shards/dbp15k_fr_en from `snag-dist prepare`).
On a shared machine, compare code versions side by side (same thread count) and also look at the
process CPU seconds: with one thread they count only the time this process ran.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from snag_dist.config import load_config
from snag_dist.engine.memory import keep_freed_memory
from snag_dist.engine.optim import build_optimizer
from snag_dist.seeding import seed_torch
from snag_dist.tasks.alignment import AlignmentTask


def main() -> None:
    mods = sys.argv[1] if len(sys.argv) > 1 else "[structure,relation]"
    cfg = load_config("dbp15k_fr_en", ["data.shards=shards/dbp15k_fr_en", f"model.modalities={mods}"])
    if cfg.engine.keep_freed_memory:  # as `snag-dist train` does
        keep_freed_memory()
    seed_torch(0)
    task = AlignmentTask.from_config(cfg)
    opt = build_optimizer(task.module, cfg.train.lr, cfg.train.weight_decay)
    times, cpu_times = [], []
    for epoch in range(3):
        task.on_epoch_start(epoch, task.module, task.phases(10)[0])
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in task.batches(epoch):
            task.module(batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(task.module.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    task.evaluate(task.module, "test")
    print(json.dumps({"threads": torch.get_num_threads(), "epoch_seconds": times, "epoch_cpu_seconds": cpu_times,
                      "test_eval_seconds": time.perf_counter() - t0, "test_eval_cpu_seconds": time.process_time() - c0,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
