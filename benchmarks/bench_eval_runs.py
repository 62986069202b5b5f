"""Evaluation of trained runs at scale: time and peak RSS per process, 1 vs 2 processes.

For each size: synth + prepare as bench_scale.py (4 modalities; alignment: two KGs of N entities,
80 % linked, 30 % of the links for training, the rest test), ``snag-dist train`` on the stream path
for ``--train-steps`` steps (2 processes), then ``snag-dist eval RUN --splits test`` on that
checkpoint as 1 process and as 2 processes (torchrun, gloo), each rank loading only its rows of the
entity table. A watcher samples every process's RSS every 0.2 s. ``eval_seconds`` is the time inside
the evaluation (embedding every needed entity + ranking), ``wall`` includes start-up and loading.

    # completion, full filtered ranking of 2,000 test triples (both directions) against all N entities
    .venv/bin/python benchmarks/bench_eval_runs.py --task completion --sizes 100K 1M --nproc 1 2 \\
        --set eval.max_queries=2000
    # alignment at 2 x 1M, faiss top-k protocol (auto picks it above eval.exact_max_links)
    .venv/bin/python benchmarks/bench_eval_runs.py --task alignment --sizes 1M --nproc 2

Targets (issue 19, 2 CPU cores): completion evaluation memory flat in N (1M within 1.5x the 100K
peak); 2 x 1M alignment evaluation < 10 min and <= 4 GiB per process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import GIB, launch, run_train, shards_for, size  # noqa: E402


def run_eval(run: Path, nproc: int, sets: list[str], out_json: Path) -> dict:
    ckpt = max((run / "checkpoints").iterdir(), key=lambda p: p.stat().st_mtime).name
    args = ["eval", str(run), "--splits", "test", "--checkpoint", ckpt, "--out", str(out_json),
            *[a for s in sets for a in ("--set", s)]]
    out_json.unlink(missing_ok=True)
    res = launch(args, nproc)
    if "error" in res:
        return res
    return {**res, "checkpoint": ckpt, "test": json.loads(out_json.read_text())["test"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["completion", "alignment"], default="completion")
    ap.add_argument("--sizes", nargs="+", default=["100K", "1M"])
    ap.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true", help="evaluate the run folders an earlier call trained")
    ap.add_argument("--train-set", action="append", default=[], help="extra training overrides")
    ap.add_argument("--set", action="append", default=[], help="evaluation overrides")
    ap.add_argument("--work", default="/tmp/snag-bench-scale")
    ap.add_argument("--json", default="runs/bench/eval_runs.jsonl")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| task | entities | procs | eval s | wall s | peak RSS per process GiB | protocol | metrics |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for text in args.sizes:
        n = size(text)
        shards = shards_for(work, args.task, n)
        run = work / f"evalrun-{args.task}-{n}"
        trained = {} if args.skip_train else run_train(shards, run, args.task, 2, "accelerate", args.train_steps,
                                                       args.train_set)
        if "error" in trained:
            print(f"| {args.task} | {text} | train FAILED: {trained['error']} |", flush=True)
            continue
        for nproc in args.nproc:
            res = run_eval(run, nproc, args.set, work / "eval.json")
            row = {"date": time.strftime("%Y-%m-%d"), "task": args.task, "entities": n, "nproc": nproc,
                   "train_steps": args.train_steps, "sets": args.set, **res}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            rss = " / ".join(f"{r / GIB:.2f}" for r in res["rss"])
            if "error" in res:
                print(f"| {args.task} | {text} | {nproc} | FAILED: {res['error']} | | {rss} |", flush=True)
                continue
            test = res["test"]
            shown = {k: round(v, 4) for k, v in test.items() if isinstance(v, float) and ("mrr" in k or "hits@1" in k)
                     and "/" not in k.replace("sampled-", "").split("/", 1)[-1]}
            print(f"| {args.task} | {text} | {nproc} | {test['eval_seconds']:.1f} | {res['wall']:.1f} | {rss} | "
                  f"{test.get('protocol')} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
