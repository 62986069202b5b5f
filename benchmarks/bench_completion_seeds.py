"""KG completion headline over seeds (issue #20): SNAG multi-modal (GMNM on / off), SNAG structure-only and
a tuned PyKEEN RotatE, each with the same stopping rule, the same splits, filter and evaluator.

Arms (each run once per seed, `--parallel` runs at a time, one thread each):
  snag-mm        `snag-dist train --config MM_PRESET`              (its modalities, GMNM as the preset says: on)
  snag-mm-off    the same with `noise.enabled=false`                (GMNM off, everything else equal)
  snag-struct    `snag-dist train --config STRUCT_PRESET --set model.modalities=[structure]`
  pykeen         PyKEEN 1.11 RotatE (its own venv, `--pykeen-python`) with the best params of its own HPO
                 (`benchmarks/pykeen_hpo.py` -> best.json), Adam, Bernoulli filtered negatives, batch 1,024.
Schedule: at most `--max-epochs`, validation MRR every `--eval-every` epochs, stop after `--patience`
evaluations without a better one; the best-validation epoch's test metrics are reported. SNAG applies this
through its own engine (`train.patience`); PyKEEN writes snapshots every `--eval-every` epochs, this process
ranks each one as it appears (eval/filtered.py, the SNAG evaluator: all entities, head and tail, filtered
by train + valid + test, realistic ties) and stops the PyKEEN process by the same rule.

    .venv/bin/python benchmarks/bench_completion_seeds.py --dataset mkg_y --mm-config runs/tune/mkg_y_mm/best.yaml \
        --struct-config mkg_y_short --pykeen-best runs/tune/pykeen_mkg_y/best.json \
        --pykeen-python .venv-pykeen/bin/python --seeds 1,2,3 --out runs/bench/seeds_mkg_y

`--continue-from EARLIER_OUT` takes the SNAG runs of the same command with a lower cap as far as they are
exactly this cap's runs (see `continuation`), so raising the cap costs only the epochs after the old one.

Writes OUT/runs.jsonl (one line per finished run; finished runs are reused when the script is re-run) and
OUT/summary.md (mean +- std per arm over the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_completion import DATASETS, filtered_splits, pykeen_snapshot_metrics  # noqa: E402

METRICS = ("mrr", "hits@1", "hits@3", "hits@10")
LOCK = threading.Lock()

PYKEEN_CHILD = r"""
import json, sys, time
import numpy as np, torch
from pykeen.losses import NSSALoss
from pykeen.models import RotatE
from pykeen.training import SLCWATrainingLoop
from pykeen.training.callbacks import TrainingCallback
from pykeen.triples import TriplesFactory
raw, params, epochs, every, out, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
n_ent = sum(1 for _ in open(f"{raw}/entities.txt"))
n_rel = sum(1 for _ in open(f"{raw}/relations.txt"))
train_t = torch.as_tensor(np.loadtxt(f"{raw}/train.txt", dtype=np.int64).reshape(-1, 3))
train = TriplesFactory(mapped_triples=train_t, entity_to_id={str(i): i for i in range(n_ent)},
                       relation_to_id={str(i): i for i in range(n_rel)})
torch.manual_seed(seed)
model = RotatE(triples_factory=train, embedding_dim=params["model.embedding_dim"], random_seed=seed,
               loss=NSSALoss(margin=params["loss.margin"], adversarial_temperature=params["loss.adversarial_temperature"]))
loop = SLCWATrainingLoop(model=model, triples_factory=train, optimizer=torch.optim.Adam(model.parameters(), lr=params["optimizer.lr"]),
                         negative_sampler="bernoulli",
                         negative_sampler_kwargs=dict(num_negs_per_pos=params["negative_sampler.num_negs_per_pos"], filtered=True))
spent = [time.perf_counter(), 0.0]
class Snapshot(TrainingCallback):
    def post_epoch(self, epoch, epoch_loss, **kwargs):
        if epoch % every == 0 or epoch == epochs:
            train_s = time.perf_counter() - spent[0]
            with torch.no_grad():
                ent = self.model.entity_representations[0](indices=None).detach().clone()
                rel = self.model.relation_representations[0](indices=None).detach().clone()
            torch.save({"entity": ent, "relation": rel, "epoch": epoch, "loss": epoch_loss}, f"{out}/.epoch{epoch:05d}.pt")
            import os; os.replace(f"{out}/.epoch{epoch:05d}.pt", f"{out}/epoch{epoch:05d}.pt")
            spent[1] += train_s
            json.dump({"epoch": epoch, "train_s": spent[1]}, open(f"{out}/progress.json", "w"))
            spent[0] = time.perf_counter()
loop.train(triples_factory=train, num_epochs=epochs, batch_size=1024, callbacks=[Snapshot()], use_tqdm=False, use_tqdm_batch=False)
"""


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def snag_run(arm: str, config: str, sets: list[str], seed: int, args, out: Path, resume: bool = False) -> dict:
    run = out / f"{arm}-s{seed}"
    cmd = [sys.executable, "-m", "snag_dist", "train", "--config", config, "--out", str(run), "--quiet",
           *(["--resume", "auto"] if resume else ["--overwrite"])]
    for s in [*sets, f"train.seed={seed}", f"train.epochs={args.max_epochs}", f"train.eval_every={args.eval_every}",
              f"train.patience={args.patience}", *args.set]:
        cmd += ["--set", s]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((run / "summary.json").read_text())
    valid = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [v for v in valid if v["split"] == "valid"]
    epochs = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    return {"arm": arm, "seed": seed, "test": {k: summary["test"]["base"][k] for k in METRICS},
            "best_epoch": summary["best_epoch"], "epochs_run": len(epochs),
            "best_valid_mrr": max(v["mrr"] for v in valid), "wall_s": wall,
            "train_s": sum(e["seconds"] for e in epochs), "command": " ".join(cmd[1:]), "run": str(run)}


def stopped_by_patience(row: dict, patience: int) -> bool:
    """Whether a finished SNAG run stopped by its patience rule (at or before its cap)."""
    valid = [json.loads(x) for x in (Path(row["run"]) / "metrics.jsonl").read_text().splitlines()]
    return sum(v["split"] == "valid" and v["epoch"] > row["best_epoch"] for v in valid) >= patience


def continuation(row: dict, args, make_job):
    """How a SNAG run of an earlier, shorter-capped OUT (`--continue-from`) becomes this cap's run, exactly:
    its row as it is when it stopped by patience; the engine's `--resume auto` with the raised
    train.epochs on a copy of its folder when it ended on its best epoch (the engine refuses anything that
    would not equal the run started with this cap); None (train it anew) otherwise. Needs an lr that does
    not depend on the cap (constant, no warm-up), as the engine checks."""
    import yaml

    train = yaml.safe_load((Path(row["run"]) / "config.yaml").read_text())["train"]
    if train["lr_schedule"] != "constant" or train["warmup_ratio"] > 0 or train["patience"] != args.patience:
        return None
    if stopped_by_patience(row, args.patience):
        return lambda: {**row, "continued_from": row["run"], "note": f"stopped by patience under a cap of {train['epochs']}"}
    if row["best_epoch"] != row["epochs_run"] - 1:
        return None
    dst = args.out / Path(row["run"]).name

    def job():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(row["run"], dst)
        new = make_job(resume=True)
        return {**new, "wall_s": row["wall_s"] + new["wall_s"], "continued_from": row["run"],
                "note": f"resumed from epoch {train['epochs']} with train.epochs={args.max_epochs}"}
    return job


def pykeen_run(seed: int, args, out: Path, known, splits) -> dict:
    run = out / f"pykeen-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    for old in run.glob("*epoch*.pt"):
        old.unlink()
    params = json.loads(Path(args.pykeen_best).read_text())["params"]
    raw = DATASETS[args.dataset][0]
    cmd = [args.pykeen_python, "-c", PYKEEN_CHILD, str(raw), json.dumps(params), str(args.max_epochs),
           str(args.eval_every), str(run), str(seed)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    best, bad, epoch = None, 0, 0
    while epoch < args.max_epochs:
        epoch += args.eval_every
        epoch = min(epoch, args.max_epochs)
        snap = run / f"epoch{epoch:05d}.pt"
        while not snap.exists():
            if proc.poll() is not None and not snap.exists():
                raise RuntimeError(f"PyKEEN stopped before epoch {epoch} (exit {proc.returncode}): {' '.join(cmd[:2])}")
            time.sleep(1.0)
        m = pykeen_snapshot_metrics(args.dataset, snap, known, splits)
        if best is None or m["valid"]["mrr"] > best["valid_mrr"]:
            best, bad = {"valid_mrr": m["valid"]["mrr"], "test": m["test"], "epoch": epoch}, 0
        else:
            bad += 1
        if bad >= args.patience:
            break
    proc.kill() if proc.poll() is None else None
    proc.wait()
    wall = time.perf_counter() - start
    progress = json.loads((run / "progress.json").read_text())
    for old in run.glob("epoch*.pt"):
        old.unlink()
    return {"arm": "pykeen", "seed": seed, "test": {k: best["test"][k] for k in METRICS}, "best_epoch": best["epoch"],
            "epochs_run": epoch, "best_valid_mrr": best["valid_mrr"], "wall_s": wall, "train_s": progress["train_s"],
            "params": params, "command": f"PyKEEN RotatE {json.dumps(params)}", "run": str(run)}


def summarize(rows: list[dict], args) -> str:
    lines = ["| arm | seeds | test MRR % | H@1 % | H@3 % | H@10 % | best epoch | epochs run | valid MRR % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in ("snag-mm", "snag-mm-off", "snag-struct", "pykeen"):
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue

        def ms(vals):
            vals = [100 * v for v in vals]
            return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

        cells = [ms([r["test"][k] for r in rs]) for k in METRICS]
        lines.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {' | '.join(cells)} | "
                     f"{'/'.join(str(r['best_epoch']) for r in rs)} | {'/'.join(str(r['epochs_run']) for r in rs)} | "
                     f"{ms([r['best_valid_mrr'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=[d for d in DATASETS if d != "db15k_mini"])
    ap.add_argument("--mm-config", required=True, help="SNAG multi-modal config (preset or YAML, e.g. a tune's best.yaml)")
    ap.add_argument("--struct-config", required=True, help="SNAG structure-only config (preset or YAML)")
    ap.add_argument("--pykeen-best", required=True, help="best.json of benchmarks/pykeen_hpo.py")
    ap.add_argument("--pykeen-python", required=True, help="python of the PyKEEN venv")
    ap.add_argument("--arms", default="snag-mm,snag-mm-off,snag-struct,pykeen")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--patience", type=int, default=4, help="evaluations without a better validation MRR before stopping")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--set", action="append", default=[], help="extra override for every SNAG run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--continue-from", type=Path, default=None,
                    help="an earlier OUT of the same command with a lower --max-epochs: its SNAG runs that stopped "
                         "by patience are reused, those that ended on their best epoch are resumed to the new cap "
                         "(exactly the runs this command would train), the others are trained anew")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    have = {(r["arm"], r["seed"]) for r in done}
    earlier = {}
    if args.continue_from is not None:
        earlier = {(r["arm"], r["seed"]): r for r in map(json.loads, (args.continue_from / "runs.jsonl").read_text().splitlines())}
    known, splits = filtered_splits(args.dataset)
    torch.set_num_threads(1)
    jobs = []
    snag = {"snag-mm": (args.mm_config, []), "snag-mm-off": (args.mm_config, ["noise.enabled=false"]),
            "snag-struct": (args.struct_config, ["model.modalities=[structure]"])}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            if (arm, seed) in have:
                continue
            if arm in snag:
                def make_job(resume=False, a=arm, s=seed):
                    return snag_run(a, *snag[a], s, args, args.out, resume=resume)
                job = continuation(earlier[arm, seed], args, make_job) if (arm, seed) in earlier else None
                jobs.append(job or make_job)
            elif arm == "pykeen":
                jobs.append(lambda s=seed: pykeen_run(s, args, args.out, known, splits))
            else:
                ap.error(f"unknown arm {arm}")

    def run(job):
        row = job()
        with LOCK:
            with open(log, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("arm", "seed", "test", "best_epoch", "epochs_run", "wall_s")}), flush=True)
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        done += list(pool.map(run, jobs))
    text = (f"{args.dataset}: max {args.max_epochs} epochs, validation every {args.eval_every}, patience {args.patience}; "
            f"seeds {args.seeds}\n\n" + summarize(done, args))
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
