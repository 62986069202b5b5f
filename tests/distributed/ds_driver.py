"""Run under torchrun (2 processes): DeepSpeed ZeRO 1/2/3 train, checkpoint, resume; sharded eval.

For each stage: a full run; a copy of it cut back to a mid-epoch checkpoint and resumed (must end
with the same weights); then the best weights evaluated split over the ranks and on one rank.
Writes RESULTS_DIR/result.json (rank 0). Arguments: SHARDS RESULTS_DIR STAGES(comma) [override ...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from snag_dist.config import load_config
from snag_dist.engine.checkpoint import load_checkpoint
from snag_dist.engine.dist import Collectives
from snag_dist.engine.run import build_task, train


def main() -> None:
    shards, out, stages, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
    result = {}
    for stage in stages:
        cfg = load_config("quickstart", [f"data.shards={shards}", "engine.backend=deepspeed",
                                         f"engine.zero_stage={stage}", *extra])
        full, part = out / f"z{stage}", out / f"z{stage}_resumed"
        train(cfg, full, progress=False)
        rank = dist.get_rank()
        if rank == 0:
            shutil.copytree(full, part)
            ckpts = part / "checkpoints"
            for p in ckpts.iterdir():  # back to the first mid-epoch checkpoint of epoch 1
                if p.name.startswith("epoch_") and p.name != "epoch_1_step_2":
                    shutil.rmtree(p)
        dist.barrier()
        train(cfg, part, resume=True, progress=False)
        # The best weights evaluated on 2 ranks (each a shard, sums reduced) and on this rank alone.
        task = build_task(cfg, rank, dist.get_world_size(), torch.device("cpu"))
        model, _, _ = load_checkpoint(full / "checkpoints" / "best")
        task.module.load_state_dict(model)
        task.attach(Collectives.current())
        sharded = task.evaluate(task.module, "test")
        task.attach(Collectives())
        single = task.evaluate(task.module, "test")
        result[stage] = {"sharded": sharded, "single": single}
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
