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
              with `pip install pykeen`; PyKEEN is not a project dependency): per lr of --pykeen-lrs it
              trains --pykeen-epochs epochs and saves embeddings every --pykeen-eval-every epochs; every
              snapshot is ranked by this project's filtered evaluator (same filter, same realistic ties as
              SNAG), epoch and lr are chosen on validation MRR, that snapshot's test metrics reported.
              PyKEEN's own evaluator is timed on --pykeen-eval-sample test triples (scaled to the split).

    .venv/bin/python benchmarks/bench_completion.py --datasets db15k,mkg_w,mkg_y --epochs 1000
    .venv/bin/python benchmarks/bench_completion.py --phases throughput --datasets db15k
    .venv/bin/python benchmarks/bench_completion.py --datasets db15k_mini --epochs 2 --steps 3   # smoke
    .venv/bin/python benchmarks/bench_completion.py --phases train,pykeen --datasets db15k --epochs 25 \
        --eval-every 5 --set train.lr=2e-3 --pykeen-python .venv-pykeen/bin/python --pykeen-lrs 1e-2 \
        --pykeen-epochs 25 --pykeen-eval-every 5 --pykeen-eval-sample 300      # the 2026-11-26 short schedule
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
        cmd = [sys.executable, "-m", "snag_dist", "prepare", str(raw), "--out", str(out), "--quiet"]
        subprocess.run(cmd + (["--text", "minilm"] if names else []), check=True)
    return out


def overrides(dataset: str, variant: str, extra: list[str]) -> list[str]:
    sets, names = VARIANTS[variant]
    return [f"data.shards={shards_for(dataset, names)}", *sets, *extra]


# -- throughput (in-process) -------------------------------------------------------------------
def throughput(dataset: str, variant: str, extra: list[str], warmup: int, steps: int) -> dict:

    from snag_dist.config import load_config
    from snag_dist.engine.optim import build_optimizer
    from snag_dist.seeding import seed_torch
    from snag_dist.tasks.completion import CompletionTask

    cfg = load_config(DATASETS[dataset][1], overrides(dataset, variant, extra))
    seed_torch(cfg.train.seed)
    task = CompletionTask.from_config(cfg)
    module = task.module
    optimizer = build_optimizer(module, cfg.train.lr, cfg.train.weight_decay, cfg.train.embedding_lr_scale,
                                cfg.train.lr_scales)
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
def train_run(dataset: str, variant: str, epochs: int, eval_every: int, extra: list[str], tag: str = "") -> dict:
    run = REPO / "runs" / "bench" / f"completion-{dataset}-{variant}-e{epochs}{'-' + tag if tag else ''}"
    sets = [*overrides(dataset, variant, extra), f"train.epochs={epochs}", f"train.eval_every={eval_every}"]
    cmd = [sys.executable, "-m", "snag_dist", "train", "--config", DATASETS[dataset][1], "--out", str(run), "--quiet", "--overwrite"]
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
# PyKEEN trains (its own venv) and writes the entity / relation embeddings every `every` epochs;
# this process then ranks every snapshot with the same filtered evaluator as SNAG (eval/filtered.py:
# same known triples, same realistic ties), selects the epoch and lr on validation MRR (validation
# triples that are training triples dropped, as for SNAG) and reports that snapshot's test metrics.
# (PyKEEN's own CPU evaluator takes ~200 s per DB15K test pass: a per-epoch early stopper on it
# would cost more than the training. Its time is measured once, on `--pykeen-eval-sample` test
# triples, and scaled to the split.)
PYKEEN_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from pykeen.evaluation import RankBasedEvaluator
from pykeen.models import RotatE
from pykeen.losses import NSSALoss
from pykeen.training import SLCWATrainingLoop
from pykeen.training.callbacks import TrainingCallback
from pykeen.triples import TriplesFactory
raw, lr, epochs, every, out, eval_sample = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
dim, negs, batch, seed = 128, 32, 1024, 42
n_ent = sum(1 for _ in open(f"{raw}/entities.txt"))
n_rel = sum(1 for _ in open(f"{raw}/relations.txt"))
def load(split):
    return torch.as_tensor(np.loadtxt(f"{raw}/{split}.txt", dtype=np.int64).reshape(-1, 3))
train_t, valid_t, test_t = load("train"), load("valid"), load("test")
train = TriplesFactory(mapped_triples=train_t, entity_to_id={str(i): i for i in range(n_ent)},
                       relation_to_id={str(i): i for i in range(n_rel)})
torch.manual_seed(seed)
model = RotatE(triples_factory=train, embedding_dim=dim, loss=NSSALoss(margin=12.0, adversarial_temperature=2.0),
               random_seed=seed)
loop = SLCWATrainingLoop(model=model, triples_factory=train, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                         negative_sampler="bernoulli", negative_sampler_kwargs=dict(num_negs_per_pos=negs, filtered=True))
save_s = [0.0]
class Snapshot(TrainingCallback):
    def post_epoch(self, epoch, epoch_loss, **kwargs):
        if epoch % every == 0 or epoch == epochs:
            start = time.perf_counter()
            with torch.no_grad():
                ent = self.model.entity_representations[0](indices=None).detach().clone()
                rel = self.model.relation_representations[0](indices=None).detach().clone()
            torch.save({"entity": ent, "relation": rel, "epoch": epoch, "loss": epoch_loss}, f"{out}/epoch{epoch:05d}.pt")
            save_s[0] += time.perf_counter() - start
start = time.perf_counter()
losses = loop.train(triples_factory=train, num_epochs=epochs, batch_size=batch, callbacks=[Snapshot()],
                    use_tqdm=False, use_tqdm_batch=False)
train_s = time.perf_counter() - start - save_s[0]
row = {"lr": lr, "epochs_run": len(losses), "train_s": train_s, "triples_per_s": len(train_t) * len(losses) / train_s}
if eval_sample:
    # PyKEEN's own evaluator (standard filter: train + valid + test), timed on the first test triples.
    sample = test_t[:eval_sample]
    start = time.perf_counter()
    RankBasedEvaluator(filtered=True).evaluate(model, sample, additional_filter_triples=[train_t, valid_t, test_t],
                                               use_tqdm=False)
    row["eval_sample_s"], row["eval_sample"] = time.perf_counter() - start, len(sample)
print(json.dumps(row))
"""


def pykeen_snapshot_metrics(dataset: str, path: Path, known, splits: dict) -> dict:
    """Filtered MRR / Hits of a PyKEEN RotatE snapshot: score = -||h o r - t||_2 (PyKEEN's RotatE)."""
    import torch

    from snag_dist.eval.filtered import filtered_rank_stats, metrics_from_stats

    snap = torch.load(path, weights_only=True)  # tensors only, written by the PyKEEN phase
    ent, rel = snap["entity"], snap["relation"]
    ent_r = torch.cat([ent.real, ent.imag], -1).float()  # (N, 2D): ||x - e||^2 = |x|^2 + |e|^2 - 2 <x, e>
    ent_sq = (ent_r * ent_r).sum(-1)

    def score(anchor, r, predict_head):
        rot = rel[r].conj() if predict_head else rel[r]  # |h o r - t| = |h - t o conj(r)|
        x = ent[anchor] * rot
        x_r = torch.cat([x.real, x.imag], -1).float()
        sq = (x_r * x_r).sum(-1, keepdim=True) + ent_sq[None] - 2 * x_r @ ent_r.T
        return -sq.clamp_min(0).sqrt()

    return {split: metrics_from_stats(filtered_rank_stats(score, t, known, 1024, "realistic"))
            for split, t in splits.items()}


def filtered_splits(dataset: str):
    """(known triples of all splits, {valid (minus training triples), test}) from the raw text files:
    the filter and splits SNAG's runs use, for ranking PyKEEN snapshots."""
    import numpy as np
    import torch

    from snag_dist.eval.filtered import KnownTriples

    raw = DATASETS[dataset][0]
    load = {s: torch.from_numpy(np.loadtxt(raw / f"{s}.txt", dtype=np.int64).reshape(-1, 3))
            for s in ("train", "valid", "test")}
    n_ent = sum(1 for _ in open(raw / "entities.txt"))
    n_rel = sum(1 for _ in open(raw / "relations.txt"))
    known = KnownTriples(torch.cat(list(load.values())), n_ent, n_rel)
    train_known = KnownTriples(load["train"], n_ent, n_rel)
    v = load["valid"]
    return known, {"valid": v[~train_known.contains(v[:, 0], v[:, 1], v[:, 2])], "test": load["test"]}


def pykeen_run(dataset: str, python: str, lrs: list[float], epochs: int, every: int, eval_sample: int) -> dict:
    known, splits = filtered_splits(dataset)
    raw = DATASETS[dataset][0]
    best, rows = None, []
    for i, lr in enumerate(lrs):
        out = REPO / "runs" / "bench" / f"pykeen-{dataset}-lr{lr:g}-e{epochs}"
        done = out / "row.json"  # a finished run of this lr and schedule is reused (grid extended later)
        if not done.is_file():
            out.mkdir(parents=True, exist_ok=True)
            cmd = [python, "-c", PYKEEN_SCRIPT, str(raw), str(lr), str(epochs), str(every), str(out),
                   str(eval_sample if i == 0 else 0)]
            res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            done.write_text(res.stdout.strip().splitlines()[-1])
        row = json.loads(done.read_text())
        for snap in sorted(out.glob("epoch*.pt")):
            start = time.perf_counter()
            m = pykeen_snapshot_metrics(dataset, snap, known, splits)
            epoch = int(snap.stem[5:])
            rec = {"lr": lr, "epoch": epoch, "valid_mrr": m["valid"]["mrr"], "test": m["test"],
                   "shared_eval_s": time.perf_counter() - start}
            print(json.dumps({"dataset": dataset, **rec}), file=sys.stderr, flush=True)
            if best is None or rec["valid_mrr"] > best["valid_mrr"]:
                best = {**row, **rec, "best_epoch": epoch}
        rows.append(row)
    sample = next(r for r in rows if "eval_sample_s" in r) if eval_sample else None
    if sample:
        best["eval_s"] = sample["eval_sample_s"] * 2 * len(splits["test"]) / (2 * sample["eval_sample"])
        best["eval_note"] = f"PyKEEN evaluator, {sample['eval_sample']} test triples timed, scaled"
    best["grid"] = [{"lr": r["lr"], "triples_per_s": r["triples_per_s"]} for r in rows]
    return {"dataset": dataset, **best}


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
                         f"{r['triples_per_s']:,.0f} | {r.get('eval_s', float('nan')):.1f} | epoch {r['best_epoch']}, lr {r['lr']} |")
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
    ap.add_argument("--tag", default="", help="suffix of the SNAG run folders (runs/bench/completion-...-TAG)")
    ap.add_argument("--pykeen-python", default="", help="python of a venv with pykeen installed")
    ap.add_argument("--pykeen-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--pykeen-epochs", type=int, default=1000)
    ap.add_argument("--pykeen-eval-every", type=int, default=50, help="epochs between PyKEEN snapshots (validation)")
    ap.add_argument("--pykeen-eval-sample", type=int, default=1000,
                    help="test triples on which PyKEEN's own evaluator is timed (0 = not timed)")
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
    runs = ([train_run(d, v, args.epochs, args.eval_every, args.set, args.tag) for d, v in pairs]
            if "train" in phases else [])
    keen = []
    if "pykeen" in phases:
        if not args.pykeen_python:
            ap.error("the pykeen phase needs --pykeen-python")
        lrs = [float(x) for x in args.pykeen_lrs.split(",")]
        keen = [pykeen_run(d, args.pykeen_python, lrs, args.pykeen_epochs, args.pykeen_eval_every,
                           args.pykeen_eval_sample)
                for d in args.datasets.split(",")]
    text = report(args, speed, runs, keen)
    results = Path(args.results)
    if not results.exists():
        results.write_text("# snag-dist benchmark results\n")
    with open(results, "a") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
