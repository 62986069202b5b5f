"""Seconds per epoch, test-evaluation time and peak RSS of the paper configuration on DBP15K FR-EN.

Run on an otherwise idle machine: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_alignment_speed.py`
(argument: model.modalities, default [structure,relation]; needs shards/dbp15k_fr_en from `snag-dist prepare`).
"""
import json
import sys
import time

import torch

from snag_dist.config import load_config
from snag_dist.engine.optim import build_optimizer
from snag_dist.tasks.alignment import AlignmentTask

mods = sys.argv[1] if len(sys.argv) > 1 else "[structure,relation]"
cfg = load_config("dbp15k_fr_en", ["data.shards=shards/dbp15k_fr_en", f"model.modalities={mods}"])
torch.manual_seed(0)
t = AlignmentTask(cfg)
opt = build_optimizer(t.module, 5e-4, 1e-3)
times = []
for ep in range(3):
    t.on_epoch_start(ep, t.module, t.phases(10)[0])
    t0 = time.perf_counter()
    for b in t.batches(ep):
        l = t.module(b); l["loss"].backward(); torch.nn.utils.clip_grad_norm_(t.module.parameters(), 1.0); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t0)
t0 = time.perf_counter(); m = t.evaluate(t.module, "test"); ev = time.perf_counter() - t0
import resource

print(json.dumps({"threads": torch.get_num_threads(), "epoch_seconds": times, "test_eval_seconds": ev,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
