"""KG completion on real DB15K / MKG-W / MKG-Y: SNAG's MRR and Hits, training triples/s, eval seconds.

Questions (issue 5, TARGETS.md):
  * accuracy: SNAG (RotatE on the fused entity vector, the paper's run parameters from the per-dataset
    presets) on structure only and on structure + entity names (all-MiniLM-L6-v2 embeddings), side
    by side with a tuned PyKEEN RotatE (same splits, embedding 128, filtered realistic ranking);
  * speed: training triples/s with fusion (target >= 11,000 on DB15K) and structure only (>= 3x),
    and the filtered evaluation of the test split, head and tail (target <= 12 s on DB15K).
The paper's multi-modal MRR (images + text, not available offline) is shown as the target for when
those features are supplied. Every number says which modalities produced it.

Phases, each optional:
  throughput  in-process: --steps timed training steps (after --warmup steps, which include any
              kernel compilation) and two timed test evaluations (first incl. compilation, then warm);
  train       `snag-dist train` per dataset x variant; test metrics of the best-validation checkpoint;
  pykeen      a PyKEEN RotatE per dataset with the python given by --pykeen-python (a separate venv
              with `pip install pykeen`; PyKEEN is not a project dependency); lr grid, each run early-
              stopped on validation MRR, the best one's test metrics reported.

    .venv/bin/python benchmarks/bench_completion.py --datasets db15k,mkg_w,mkg_y --epochs 1000
    .venv/bin/python benchmarks/bench_completion.py --phases throughput --datasets db15k
    .venv/bin/python benchmarks/bench_completion.py --datasets db15k_mini --epochs 2 --steps 3   # smoke
Shards are prepared on first use under shards/ (names need the sentence model: `--text minilm`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MKGC = REPO.parent / "shared" / "data" / "MKGC"

# name -> (raw directory, preset, paper's multi-modal MRR (percent) or None)
DATASETS = {
    "db15k": (MKGC / "DB15K", "db15k", 36.3),
    "mkg_w": (MKGC / "MKG-W", "mkg_w", 37.3),
    "mkg_y": (MKGC / "MKG-Y", "mkg_y", 39.1),
    "db15k_mini": (REPO / "data" / "sample" / "db15k_mini", "quickstart_completion", None),
}
# variant -> (overrides, needs name features)
VARIANTS = {
    "structure": (["model.modalities=[structure]"], False),
    "structure+name": (["model.modalities=[structure,name]"], True),
    # not a default: the structure token without the fusion Transformer (RotatE on a projected embedding)
    "structure-concat": (["model.modalities=[structure]", "model.fusion=concat"], False),
}
PAPER_MODALITIES = "structure + image + text"


def shards_for(dataset: str, names: bool) -> Path:
    raw = DATASETS[dataset][0]
    out = REPO / "shards" / f"{dataset}{'_names' if names else ''}"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "snag_dist", "prepare", str(raw), str(out), "--quiet"]
        subprocess.run(cmd + (["--text", "minilm"] if names else []), check=True)
    return out


def overrides(dataset: str, variant: str, extra: list[str]) -> list[str]:
    sets, names = VARIANTS[variant]
    return [f"data.shards={shards_for(dataset, names)}", *sets, *extra]


# -- throughput (in-process) -------------------------------------------------------------------
def throughput(dataset: str, variant: str, extra: list[str], warmup: int, steps: int) -> dict:
    import torch

    from snag_dist.config import load_config
    from snag_dist.engine.optim import build_optimizer
    from snag_dist.tasks.completion import CompletionTask

    cfg = load_config(DATASETS[dataset][1], overrides(dataset, variant, extra))
    torch.manual_seed(cfg.train.seed)
    task = CompletionTask(cfg)
    module = task.module
    optimizer = build_optimizer(module, cfg.train.lr, cfg.train.weight_decay)
    task.on_epoch_start(0, module, None)
    module.train()
    times, rows = [], 0
    batches = task.batches(0)
    for i in range(warmup + steps):
        batch = next(batches, None)
        if batch is None:
            batches = task.batches(i)
            batch = next(batches)
        start = time.perf_counter()
        loss = module(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            rows = len(batch.triples)
    evals = []
    for _ in range(2):
        start = time.perf_counter()
        metrics = task.evaluate(module, "test")
        evals.append(time.perf_counter() - start)
    return {"dataset": dataset, "variant": variant, "triples_per_s": rows / statistics.median(times),
            "step_ms": 1000 * statistics.median(times), "eval_first_s": evals[0], "eval_warm_s": evals[1],
            "test_triples": len(task.triples["test"]), "entities": task.num_entities, "untrained_mrr": metrics["mrr"]}


# -- full training (CLI) -----------------------------------------------------------------------
def train_run(dataset: str, variant: str, epochs: int, eval_every: int, extra: list[str]) -> dict:
    run = REPO / "runs" / "bench" / f"completion-{dataset}-{variant}-e{epochs}"
    sets = [*overrides(dataset, variant, extra), f"train.epochs={epochs}", f"train.eval_every={eval_every}"]
    cmd = [sys.executable, "-m", "snag_dist", "train", "--config", DATASETS[dataset][1], "--out", str(run), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    summary = json.loads((run / "summary.json").read_text())
    secs = [json.loads(x)["seconds"] for x in (run / "train.jsonl").read_text().splitlines()]
    manifest = json.loads((shards_for(dataset, VARIANTS[variant][1]) / "manifest.json").read_text())
    train_triples = manifest["counts"]["triples"]["train"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snag_dist", "eval", str(run), "--splits", "test"], check=True,
                   capture_output=True)
    return {"dataset": dataset, "variant": variant, "test": summary["test"]["base"],
            "triples_per_s": train_triples / statistics.median(secs), "eval_process_s": time.perf_counter() - start,
            "best_epoch": summary["best_epoch"], "run": str(run.relative_to(REPO))}


# -- PyKEEN RotatE (its own venv) --------------------------------------------------------------
PYKEEN_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from pykeen.pipeline import pipeline
from pykeen.triples import TriplesFactory
raw, lrs, epochs, dim, negs, batch, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), 128, 32, 1024, 42
n_ent = sum(1 for _ in open(f"{raw}/entities.txt"))
n_rel = sum(1 for _ in open(f"{raw}/relations.txt"))
def tf(split):
    t = torch.as_tensor(np.loadtxt(f"{raw}/{split}.txt", dtype=np.int64).reshape(-1, 3))
    return TriplesFactory(mapped_triples=t, entity_to_id={str(i): i for i in range(n_ent)},
                          relation_to_id={str(i): i for i in range(n_rel)})
train, valid, test = tf("train"), tf("valid"), tf("test")
# As for SNAG (task.completion.dedupe_valid): select on validation triples that are not training triples.
seen = {tuple(t) for t in train.mapped_triples.tolist()}
keep = torch.tensor([tuple(t) not in seen for t in valid.mapped_triples.tolist()])
valid = TriplesFactory(mapped_triples=valid.mapped_triples[keep], entity_to_id=train.entity_to_id,
                       relation_to_id=train.relation_to_id)
best = None
for lr in lrs:
    res = pipeline(training=train, validation=valid, testing=test, model="RotatE",
                   model_kwargs=dict(embedding_dim=dim), optimizer="Adam", optimizer_kwargs=dict(lr=lr),
                   loss="NSSALoss", loss_kwargs=dict(margin=12.0, adversarial_temperature=2.0),
                   negative_sampler="bernoulli", negative_sampler_kwargs=dict(num_negs_per_pos=negs, filtered=True),
                   training_kwargs=dict(num_epochs=epochs, batch_size=batch), random_seed=seed,
                   stopper="early", stopper_kwargs=dict(frequency=max(1, epochs // 20), patience=5,
                                       metric="inverse_harmonic_mean_rank"),
                   evaluator_kwargs=dict(filtered=True), device="cpu")
    get = res.metric_results.get_metric
    row = {"lr": lr, "valid_mrr": float(res.stopper.best_metric), "train_s": res.train_seconds,
           "eval_s": res.evaluate_seconds, "epochs_run": len(res.losses),
           "triples_per_s": train.num_triples * len(res.losses) / res.train_seconds,
           "test": {"mrr": get("both.realistic.inverse_harmonic_mean_rank"),
                    **{f"hits@{k}": get(f"both.realistic.hits_at_{k}") for k in (1, 3, 10)}}}
    print(json.dumps(row), file=sys.stderr)
    if best is None or row["valid_mrr"] > best["valid_mrr"]:
        best = row
print(json.dumps(best))
"""


def pykeen_run(dataset: str, python: str, lrs: list[float], epochs: int) -> dict:
    raw = DATASETS[dataset][0]
    out = subprocess.run([python, "-c", PYKEEN_SCRIPT, str(raw), json.dumps(lrs), str(epochs)], check=True,
                         capture_output=True, text=True)
    return {"dataset": dataset, **json.loads(out.stdout.strip().splitlines()[-1])}


# -- report ------------------------------------------------------------------------------------
def fmt_metrics(m: dict) -> str:
    return " | ".join(f"{100 * m[k]:.1f}" for k in ("mrr", "hits@1", "hits@3", "hits@10"))


def report(args: argparse.Namespace, speed: list[dict], runs: list[dict], keen: list[dict]) -> str:
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [f"\n## KG completion: {', '.join(args.datasets.split(','))} ({dt.date.today()})\n",
             f"Command: `{cmd}`  \nMachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"torch CPU, fp32, threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"--threads {args.threads or 'default'}. Filtered ranking over all "
             "entities, head and tail, realistic ties; SNAG selected on validation MRR (validation triples that "
             "are training triples dropped, task.completion.dedupe_valid).\n"]
    if speed:
        lines += ["| dataset | SNAG modalities | train triples/s (median step) | step ms | test eval s (first, incl. "
                  "compile) | test eval s (warm) | test triples |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['variant']} | {r['triples_per_s']:,.0f} | {r['step_ms']:.1f} | "
                  f"{r['eval_first_s']:.1f} | {r['eval_warm_s']:.1f} | {r['test_triples']:,} |" for r in speed]
        lines.append("")
    if runs or keen:
        lines += ["| dataset | model | modalities | test MRR % | H@1 % | H@3 % | H@10 % | train triples/s | eval s "
                  "(own process) | best epoch / lr |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['dataset']} | SNAG | {r['variant']} | {fmt_metrics(r['test'])} | "
                         f"{r['triples_per_s']:,.0f} | {r['eval_process_s']:.1f} | {r['best_epoch']} |")
        for r in keen:
            lines.append(f"| {r['dataset']} | PyKEEN RotatE (tuned lr) | structure | {fmt_metrics(r['test'])} | "
                         f"{r['triples_per_s']:,.0f} | {r['eval_s']:.1f} | lr {r['lr']} |")
        for name in args.datasets.split(","):
            paper = DATASETS[name][2]
            if paper is not None:
                lines.append(f"| {name} | SNAG (paper) | {PAPER_MODALITIES} | {paper} | | | | | | target once "
                             "image/text features are supplied |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="db15k,mkg_w,mkg_y")
    ap.add_argument("--variants", default="structure,structure+name",
                    help="MKG-W has only Wikidata ids as names: its structure+name run is skipped unless named alone")
    ap.add_argument("--phases", default="throughput,train", help="throughput, train, pykeen")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="extra override for every SNAG run")
    ap.add_argument("--pykeen-python", default="", help="python of a venv with pykeen installed")
    ap.add_argument("--pykeen-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--pykeen-epochs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the throughput phase (0 = default)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    phases = set(args.phases.split(","))
    pairs = [(d, v) for d in args.datasets.split(",") for v in args.variants.split(",")
             if not (d == "mkg_w" and v == "structure+name" and args.variants != "structure+name")]
    speed = [throughput(d, v, args.set, args.warmup, args.steps) for d, v in pairs] if "throughput" in phases else []
    runs = [train_run(d, v, args.epochs, args.eval_every, args.set) for d, v in pairs] if "train" in phases else []
    keen = []
    if "pykeen" in phases:
        if not args.pykeen_python:
            ap.error("the pykeen phase needs --pykeen-python")
        lrs = [float(x) for x in args.pykeen_lrs.split(",")]
        keen = [pykeen_run(d, args.pykeen_python, lrs, args.pykeen_epochs) for d in args.datasets.split(",")]
    text = report(args, speed, runs, keen)
    results = Path(args.results)
    if not results.exists():
        results.write_text("# snag-dist benchmark results\n")
    with open(results, "a") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
