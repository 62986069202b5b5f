"""KG completion training speed, SNAG vs PyKEEN RotatE side by side (issue #20, TARGETS.md).

Arms run one after another in fresh processes, alternating, `--rounds` times, on the same machine state:
each trains one full epoch of the dataset's training triples (after `--warmup` steps that are not timed)
at entity width 128 complex, 32 negatives per positive, batch 1,024, with unfiltered and with filtered
negatives, and reports triples/s (wall) and CPU seconds per 1M triples (process CPU time, all threads).
The timed loop includes making the batches (negative sampling, filtering) on both sides.

  pykeen-*        PyKEEN 1.11 RotatE, sLCWA, Bernoulli negatives (`filtered=True` for -filt), Adam (own venv)
  snag-struct-*   SNAG structure token only (`db15k_short` settings), negatives shared by `negative_chunk`
                  positives (16: the preset; 1: one draw per positive, as PyKEEN), fp32 or bf16 autocast
  snag-fused-*    SNAG structure + relation + name tokens through the Transformer fusion, GMNM on
                  (`db15k_mm`), fp32 or bf16 autocast (bf16 runs the encoders and fusion in bf16; RotatE
                  distances stay fp32)
  floor-*         not SNAG, a bound: `snag-struct-*`'s step with SNAG's per-entity layers taken out (the
                  entity table's rows go straight into RotatE: same batches, shared negatives, l2 distance
                  by matrix products, loss, self negative, fused AdamW over the whole table). What a
                  structure-only step costs before any encoder or fusion runs; benchmark code only.
Then each side's filtered test evaluation once: SNAG's evaluator on the whole test split (head + tail), and
PyKEEN's RankBasedEvaluator on `--pykeen-eval-sample` test triples, scaled to the split.

    .venv/bin/python benchmarks/bench_completion_speed.py --pykeen-python .venv-pykeen/bin/python --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_completion import DATASETS, shards_for  # noqa: E402

ARMS = {
    "pykeen-unf": {"side": "pykeen", "filtered": False},
    "snag-struct-unf-c16": {"side": "snag", "config": "db15k_short", "mods": "structure", "filtered": False, "chunk": 16},
    "snag-struct-unf-c1": {"side": "snag", "config": "db15k_short", "mods": "structure", "filtered": False, "chunk": 1},
    "snag-struct-unf-c16-bf16": {"side": "snag", "config": "db15k_short", "mods": "structure", "filtered": False,
                                 "chunk": 16, "bf16": True},
    "snag-fused-unf-c16": {"side": "snag", "config": "db15k_mm", "mods": "structure,relation,name", "filtered": False,
                           "chunk": 16},
    "snag-fused-unf-c16-bf16": {"side": "snag", "config": "db15k_mm", "mods": "structure,relation,name",
                                "filtered": False, "chunk": 16, "bf16": True},
    "floor-unf-c16": {"side": "snag", "config": "db15k_short", "mods": "structure", "filtered": False, "chunk": 16,
                      "floor": True},
    "pykeen-filt": {"side": "pykeen", "filtered": True},
    "snag-struct-filt-c16": {"side": "snag", "config": "db15k_short", "mods": "structure", "filtered": True, "chunk": 16},
    "snag-fused-filt-c16-bf16": {"side": "snag", "config": "db15k_mm", "mods": "structure,relation,name",
                                 "filtered": True, "chunk": 16, "bf16": True},
}

PYKEEN_WORKER = r"""
import json, sys, time
import numpy as np, torch
from pykeen.evaluation import RankBasedEvaluator
from pykeen.losses import NSSALoss
from pykeen.models import RotatE
from pykeen.training import SLCWATrainingLoop
from pykeen.triples import TriplesFactory
raw, filtered, warmup, eval_sample = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
n_ent = sum(1 for _ in open(f"{raw}/entities.txt")); n_rel = sum(1 for _ in open(f"{raw}/relations.txt"))
load = lambda s: torch.as_tensor(np.loadtxt(f"{raw}/{s}.txt", dtype=np.int64).reshape(-1, 3))
train_t, valid_t, test_t = load("train"), load("valid"), load("test")
tf = TriplesFactory(mapped_triples=train_t, entity_to_id={str(i): i for i in range(n_ent)}, relation_to_id={str(i): i for i in range(n_rel)})
torch.manual_seed(0)
model = RotatE(triples_factory=tf, embedding_dim=128, loss=NSSALoss(margin=12.0, adversarial_temperature=2.0), random_seed=0)
loop = SLCWATrainingLoop(model=model, triples_factory=tf, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                         negative_sampler="bernoulli", negative_sampler_kwargs=dict(num_negs_per_pos=32, filtered=filtered))
small = TriplesFactory(mapped_triples=train_t[: warmup * 1024], entity_to_id=tf.entity_to_id, relation_to_id=tf.relation_to_id)
loop.train(triples_factory=small, num_epochs=1, batch_size=1024, use_tqdm=False, use_tqdm_batch=False)  # warm-up steps
wall, cpu = time.perf_counter(), time.process_time()
losses = loop.train(triples_factory=tf, num_epochs=1, batch_size=1024, use_tqdm=False, use_tqdm_batch=False)
assert len(losses) == 1, losses  # one epoch over all triples (the model restarts from fresh weights; same cost)
row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "triples": len(train_t)}
if eval_sample:
    start = time.perf_counter()
    RankBasedEvaluator(filtered=True).evaluate(model, test_t[:eval_sample], additional_filter_triples=[train_t, valid_t, test_t],
                                               batch_size=512, use_tqdm=False)
    row["eval_s"] = (time.perf_counter() - start) * len(test_t) / eval_sample
    row["eval_note"] = f"PyKEEN RankBasedEvaluator on {eval_sample} test triples, scaled to {len(test_t)}"
print(json.dumps(row))
"""


def snag_worker(arm: dict, dataset: str, warmup: int, evaluate: bool) -> dict:
    import contextlib

    import torch

    from snag_dist.config import load_config
    from snag_dist.engine.optim import build_optimizer
    from snag_dist.seeding import seed_torch
    from snag_dist.tasks.completion import CompletionTask

    names = "name" in arm["mods"]
    cfg = load_config(arm["config"], [f"data.shards={shards_for(dataset, names)}", f"model.modalities=[{arm['mods']}]",
                                      f"task.completion.negative_chunk={arm['chunk']}", "task.completion.negatives=32",
                                      "task.completion.dim=128", "train.batch_size=1024",
                                      f"task.completion.filter_negatives={str(arm['filtered']).lower()}"])
    seed_torch(cfg.train.seed)
    task = CompletionTask.from_config(cfg)
    module = task.module
    if arm.get("floor"):  # the table's rows are the RotatE vectors: no encoder, fusion or projection
        table = torch.nn.Embedding(task.num_entities, 2 * cfg.task.completion.dim)
        torch.nn.init.uniform_(table.weight, -module.rotate.range, module.rotate.range)
        module.projection, module.table = None, table
        module.model.requires_grad_(False)  # kept only for the epoch hooks (GMNM is off); never called
        module.entity_vectors = lambda ids: table(ids)
    opt = build_optimizer(module, cfg.train.lr, cfg.train.weight_decay, cfg.train.embedding_lr_scale, cfg.train.lr_scales)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if arm.get("bf16") else contextlib.nullcontext
    task.on_epoch_start(0, module, None)
    module.train()

    def step(batch):
        with cast():
            loss = module(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i, batch in enumerate(task.batches(0)):
        if i >= warmup:
            break
        step(batch)
    task.on_epoch_start(1, module, None)
    rows, wall, cpu = 0, time.perf_counter(), time.process_time()
    for batch in task.batches(1):  # batch making (negatives, filtering) is inside the timed loop
        step(batch)
        rows += len(batch.triples)
    row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "triples": rows}
    if evaluate:
        start = time.perf_counter()
        task.evaluate(module, "test")
        row["eval_s"] = time.perf_counter() - start
        row["eval_note"] = f"snag-dist filtered evaluator, all {len(task.triples['test'])} test triples"
    return row


def run_arm(name: str, args, evaluate: bool) -> dict:
    arm = ARMS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if arm["side"] == "pykeen":
        cmd = [args.pykeen_python, "-c", PYKEEN_WORKER, str(DATASETS[args.dataset][0]), "1" if arm["filtered"] else "0",
               str(args.warmup), str(args.pykeen_eval_sample if evaluate else 0)]
    else:
        cmd = [sys.executable, __file__, "--worker", name, "--dataset", args.dataset, "--warmup", str(args.warmup)]
        cmd += ["--worker-eval"] if evaluate else []
    res = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row.update(arm=name, triples_per_s=row["triples"] / row["wall_s"], cpu_s_per_1m=1e6 * row["cpu_s"] / row["triples"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="db15k", choices=["db15k", "mkg_w", "mkg_y"])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the arms")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per arm")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per arm process")
    ap.add_argument("--pykeen-python", default=str(REPO / ".venv-pykeen" / "bin" / "python"))
    ap.add_argument("--pykeen-eval-sample", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "completion_speed.jsonl")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-eval", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(snag_worker(ARMS[args.worker], args.dataset, args.warmup, args.worker_eval)))
        return
    names = args.arms.split(",")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        for name in names:
            evaluate = r == 0 and name in ("pykeen-filt", "snag-fused-filt-c16-bf16", "snag-struct-filt-c16")
            row = {**run_arm(name, args, evaluate), "round": r}
            rows.append(row)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("arm", "round", "triples_per_s", "cpu_s_per_1m")}), flush=True)
    ref = {f: statistics.median(x["triples_per_s"] for x in rows if x["arm"] == f"pykeen-{f}") for f in ("unf", "filt")
           if any(x["arm"] == f"pykeen-{f}" for x in rows)}
    print(f"\n{args.dataset}, {os.cpu_count()} cores, {args.threads} threads per process, rounds {args.rounds} (median)\n")
    print("| arm | triples/s | CPU s per 1M triples | vs PyKEEN (same filtering) | filtered test eval s |")
    print("|---|---|---|---|---|")
    for name in names:
        rs = [x for x in rows if x["arm"] == name]
        tps = statistics.median(x["triples_per_s"] for x in rs)
        cpu = statistics.median(x["cpu_s_per_1m"] for x in rs)
        f = "filt" if "filt" in name else "unf"
        ratio = f"{tps / ref[f]:.2f}x" if f in ref else "-"
        ev = next((f"{x['eval_s']:.1f} ({x['eval_note']})" for x in rs if "eval_s" in x), "")
        print(f"| {name} | {tps:,.0f} | {cpu:,.0f} | {ratio} | {ev} |")


if __name__ == "__main__":
    main()
