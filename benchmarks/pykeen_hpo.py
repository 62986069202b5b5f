"""PyKEEN's own HPO for RotatE on an MKGC dataset: the peer's side of issue #20's equal tuning budget.

Runs in a separate venv with PyKEEN (not a project dependency), e.g.
    python3 -m venv .venv-pykeen && .venv-pykeen/bin/pip install torch==2.13.0 pykeen==1.11.1
    .venv-pykeen/bin/python benchmarks/pykeen_hpo.py ../shared/data/MKGC/MKG-Y --trials 10 --epochs 20 \
        --out runs/tune/pykeen_mkg_y

`pykeen.hpo.hpo_pipeline` (Optuna, TPE sampler, seed 42) searches PyKEEN's usual RotatE space: embedding
dim, Adam lr, negatives per positive (Bernoulli corruption, filtered), NSSA margin and adversarial
temperature, at batch 1,024 for `--epochs` epochs per trial; each trial is scored by PyKEEN's own filtered
rank-based evaluator on the validation split (realistic MRR; `--valid-sample N` scores a fixed random subset,
since PyKEEN's CPU evaluator is slow), without the validation triples that are training triples (as
snag-dist's evaluator: DB15K's validation split holds 8,719 training triples; MKG-W's and MKG-Y's none). The budget is trials x epochs, the same as
`snag-dist tune --num-samples TRIALS --set train.epochs=EPOCHS` (where ASHA may stop trials earlier).

Writes OUT/results.csv (one row per trial, best first: value, params, seconds), OUT/best.json (the best
trial's params) and OUT/study.json (budget, space, timing). Nothing is pickled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch

SPACE = {
    "model_kwargs_ranges": {"embedding_dim": {"type": "categorical", "choices": [64, 128, 256]}},
    "loss_kwargs_ranges": {"margin": {"type": "categorical", "choices": [6.0, 9.0, 12.0, 16.0, 24.0]},
                           "adversarial_temperature": {"type": float, "low": 0.5, "high": 2.0}},
    "optimizer_kwargs_ranges": {"lr": {"type": float, "low": 1e-3, "high": 0.3, "log": True}},
    "negative_sampler_kwargs_ranges": {"num_negs_per_pos": {"type": "categorical", "choices": [16, 32, 64]}},
}


def factories(raw: Path, valid_sample: int = 0):
    from pykeen.triples import TriplesFactory

    n_ent = sum(1 for _ in open(raw / "entities.txt"))
    n_rel = sum(1 for _ in open(raw / "relations.txt"))
    ents, rels = {str(i): i for i in range(n_ent)}, {str(i): i for i in range(n_rel)}
    out = {}
    seen: set[tuple[int, int, int]] = set()
    for split in ("train", "valid", "test"):
        t = torch.as_tensor(np.loadtxt(raw / f"{split}.txt", dtype=np.int64).reshape(-1, 3))
        if split == "train":
            seen = set(map(tuple, t.tolist()))
        if split == "valid":
            # as snag-dist's evaluator does: validation triples that are training triples are dropped (8,719 of
            # DB15K's 9,904 are; ranked, they reward memorising the training set, and trial 0 scored 0.72)
            t = t[torch.tensor([tuple(r) not in seen for r in t.tolist()], dtype=torch.bool)]
        if split == "valid" and valid_sample:
            t = t[torch.randperm(len(t), generator=torch.Generator().manual_seed(0))[:valid_sample]]
        out[split] = TriplesFactory(mapped_triples=t, entity_to_id=ents, relation_to_id=rels)
    return out


def _exists(storage: str) -> bool:
    return "pykeen" in [s.study_name for s in optuna.get_all_study_summaries(storage=storage)]


def one_trial(args) -> None:
    from pykeen.hpo import hpo_pipeline

    tf = factories(args.raw, args.valid_sample)
    hpo_pipeline(
        training=tf["train"], validation=tf["valid"], testing=tf["test"],
        model="RotatE", loss="NSSA", optimizer="Adam", training_loop="sLCWA",
        negative_sampler="bernoulli", negative_sampler_kwargs={"filtered": True},
        epochs=args.epochs, training_kwargs={"batch_size": args.batch, "use_tqdm": False},
        evaluator="rankbased", evaluation_kwargs={"use_tqdm": False, "batch_size": 512},
        metric="both.realistic.inverse_harmonic_mean_rank", direction="maximize",
        n_trials=1, sampler="tpe", sampler_kwargs={"seed": args.seed + _finished(args.storage)},
        storage=args.storage, study_name="pykeen", load_if_exists=True,
        **SPACE,
    )


def _finished(storage: str) -> int:
    if not _exists(storage):
        return 0
    return len([t for t in optuna.load_study(study_name="pykeen", storage=storage).trials if t.state.is_finished()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path, help="MKGC dataset folder (entities.txt, relations.txt, train/valid/test.txt)")
    ap.add_argument("--trials", type=int, default=10, help="Optuna trials")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs per trial")
    ap.add_argument("--batch", type=int, default=1024, help="training batch size")
    ap.add_argument("--seed", type=int, default=42, help="sampler and model seed")
    ap.add_argument("--valid-sample", type=int, default=0,
                    help="score trials on this many validation triples (fixed random subset; 0 = all). PyKEEN's CPU "
                         "evaluator needs ~400 s for MKG-Y's 2,665 (batch 512, 2 cores), longer than a 20-epoch trial")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created; must not hold a study)")
    ap.add_argument("--one-trial", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_trial:
        return one_trial(args)
    if (args.out / "results.csv").exists():
        sys.exit(f"{args.out}: already holds a finished study (results.csv); choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(args.out / 'study.db').resolve()}"
    start = time.perf_counter()
    # One trial per process: PyKEEN's hpo_pipeline kept every trial's memory (9 GB after 3 MKG-Y trials on
    # CPU). The Optuna study lives in OUT/study.db, so TPE sees every earlier trial and a killed search
    # continues where it stopped.
    while True:
        study = optuna.load_study(study_name="pykeen", storage=storage) if _exists(storage) else None
        finished = len([t for t in study.trials if t.state.is_finished()]) if study else 0
        if finished >= args.trials:
            break
        subprocess.run([sys.executable, __file__, str(args.raw), "--one-trial", "--storage", storage, "--epochs",
                        str(args.epochs), "--batch", str(args.batch), "--seed", str(args.seed), "--valid-sample",
                        str(args.valid_sample), "--out", str(args.out)], check=True)
    study = optuna.load_study(study_name="pykeen", storage=storage)
    seconds = time.perf_counter() - start
    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, "valid_mrr": t.value,
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None,
                     **{k: v for k, v in t.params.items()}})
    rows.sort(key=lambda r: -(r["valid_mrr"] if r["valid_mrr"] is not None else -1.0))
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = args.out / f".results.csv.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(",".join(["rank", *keys]) + "\n")
        for i, r in enumerate(rows, 1):
            fh.write(",".join([str(i), *(f"{r.get(k)}" for k in keys)]) + "\n")
    best = {"valid_mrr": study.best_value, "params": study.best_params}
    (args.out / "best.json").write_text(json.dumps(best, indent=1))
    space = {k: {p: {**d, "type": getattr(d["type"], "__name__", d["type"])} for p, d in v.items()} for k, v in SPACE.items()}
    (args.out / "study.json").write_text(json.dumps({
        "raw": str(args.raw), "trials": args.trials, "epochs_per_trial": args.epochs, "budget_epochs": args.trials * args.epochs,
        "batch": args.batch, "seed": args.seed, "valid_sample": args.valid_sample or "all", "seconds": seconds, "space": space,
        "fixed": {"model": "RotatE", "loss": "NSSA", "optimizer": "Adam", "negative_sampler": "bernoulli (filtered)",
                  "metric": "both.realistic.inverse_harmonic_mean_rank on validation"}}, indent=1))
    tmp.replace(args.out / "results.csv")
    print(json.dumps({"best": best, "seconds": seconds}))


if __name__ == "__main__":
    main()
