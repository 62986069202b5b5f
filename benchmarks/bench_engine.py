"""Training throughput with 1 vs 2 processes for each backend (issue: distributed engine).

Trains alignment on a prepared shard folder with torchrun (gloo on CPU) for --epochs epochs and
reports training pairs/s (epochs after the first, from train.jsonl's per-epoch seconds), 1-process
vs 2-process ratio per backend, in one run so the ratios share the machine's conditions. One process
gets --threads x 2 threads, each of two processes --threads (the same cores either way).

    .venv/bin/python benchmarks/bench_engine.py --shards shards/dbp15k_fr_en --epochs 4
    .venv/bin/python benchmarks/bench_engine.py --config quickstart --shards runs/demo/shards/dbp15k_fr_en_mini --epochs 6
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
BACKENDS = {
    "accelerate (DDP)": ["engine.backend=accelerate"],
    "deepspeed ZeRO-1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
    "deepspeed ZeRO-3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
}


def run(config: str, shards: str, out: Path, nproc: int, threads: int, epochs: int, sets: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "snag_dist", "train", "--config", config, "--shards", shards, "--out", str(out), "--quiet", "--overwrite",
           "--set", f"train.epochs={epochs}", "--set", f"train.eval_every={epochs}", "--set", "eval.test_at_end=false",
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    secs = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]
    return {"s_per_epoch": statistics.median(secs), "wall": wall, "epochs": len(records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default="dbp15k_fr_en", help="preset or YAML (alignment)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads per process with 2 processes")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_engine"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    manifest = json.loads((Path(args.shards) / "manifest.json").read_text())
    train_links = sum(s["rows"] for s in manifest["shards"].get("links/train", []))
    rows = []
    for name, sets in BACKENDS.items():
        res = {}
        for nproc in (1, 2):
            out = Path(args.out) / f"{name.split()[0]}{sets[-1].split('=')[-1]}_{nproc}p"
            res[nproc] = run(args.config, args.shards, out, nproc, args.threads * (2 // nproc), args.epochs, sets + args.set)
            print(name, nproc, res[nproc], flush=True)
        rows.append((name, res))
    load = os.getloadavg()[0]
    lines = [f"\n## Engine: 1 vs 2 processes per backend ({dt.date.today()})\n",
             f"Command: `python benchmarks/bench_engine.py --config {args.config} --shards {args.shards} --epochs {args.epochs}"
             f"{''.join(' --set ' + s for s in args.set)}`  ",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch CPU, gloo, fp32; 1-min load at end {load:.1f}. "
             f"1 process x {2 * args.threads} threads vs 2 processes x {args.threads} (same cores). "
             f"Training links per epoch: {train_links:,} (incl. validation links held out by the task); "
             "median s/epoch after the first epoch.\n",
             "| backend | 1 process s/epoch | 2 processes s/epoch | speed-up (1p / 2p) |", "|---|---|---|---|"]
    for name, res in rows:
        a, b = res[1]["s_per_epoch"], res[2]["s_per_epoch"]
        lines.append(f"| {name} | {a:.2f} ({train_links / a:,.0f} pairs/s) | {b:.2f} ({train_links / b:,.0f} pairs/s) "
                     f"| {a / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
