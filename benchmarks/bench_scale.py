"""Does training scale: time to first step, step time, rows/s and peak RSS per process on synth MMKGs.

For each size, ``snag-dist synth`` + ``prepare`` (4 modalities: structure + image 256 / name 384 /
attribute 128, ~4.5 triples per entity; alignment: two KGs of N entities each, 30 % of the links
for training) unless the shards already exist under ``--work``; then ``snag-dist train`` on the stream
path (``data.mode=stream``) for ``--steps`` optimizer steps, validation off, as 1 process and as 2
processes (torchrun, gloo), per backend. A watcher samples the RSS of every process of the run
every 0.2 s and reports each rank's peak. Step time, data-wait share, rows/s and time to first step
come from the run's ``train.jsonl`` (medians skip the first 3 steps).

    .venv/bin/python benchmarks/bench_scale.py --task completion --sizes 100K 1M --nproc 1 2
    .venv/bin/python benchmarks/bench_scale.py --task completion --sizes 1M --nproc 2 --backends deepspeed
    .venv/bin/python benchmarks/bench_scale.py --task completion --sizes 5M --nproc 1 --steps 200
    .venv/bin/python benchmarks/bench_scale.py --task alignment --sizes 100K 1M --nproc 1 2

Targets (TARGETS.md, 2 CPU cores): 1M entities x 4 modalities <= 4 GiB per process with 2
processes, <= 6 GiB with 1; time to first step <= 30 s; a step at 1M <= 1.2x a step at 100K; 5M
trains >= 200 steps; the per-rank table halves from 1 to 2 processes; data wait <= 5 % of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MODALITIES = "image:256:0.7,name:384:1.0,attribute:128:0.9"
PRESET = {"completion": ("db15k", ["model.modalities=[structure,image,name,attribute]"]),
          "alignment": ("dbp15k_fr_en", ["model.modalities=[structure,relation,image,name,attribute]"])}


def size(text: str) -> int:
    text = text.upper()
    mult = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def shards_for(work: Path, task: str, n: int) -> Path:
    raw, out = work / f"raw-{task}-{n}", work / f"shards-{task}-{n}"
    if (out / "manifest.json").is_file():
        return out
    triples = int(4.5 * n) if task == "completion" else int(4.5 * n) * 2
    subprocess.run([sys.executable, "-m", "snag_dist", "synth", "--out", str(raw), "--entities", str(n), "--triples",
                    str(triples), "--task", task, "--modalities", MODALITIES, "--quiet"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "snag_dist", "prepare", str(raw), "--out", str(out), "--min-shards", "8",
                    "--quiet"], check=True, cwd=ROOT)
    shutil.rmtree(raw, ignore_errors=True)
    return out


class PeakRss:
    """Peak RSS of every process under ``pid`` (sampled), by pid; the ranks are the python leaves."""

    def __init__(self, pid: int) -> None:
        self.root, self.peaks, self.names = pid, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                if not psutil.pid_exists(self.root):
                    return
                continue  # a child ended while we listed them
            except psutil.Error:
                time.sleep(0.05)
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
                    self.names.setdefault(p.pid, " ".join(p.cmdline()[:6]))
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        ranks = [pid for pid, name in self.names.items() if "snag_dist" in name and "torch.distributed.run" not in name]
        return sorted((self.peaks[p] for p in ranks), reverse=True)


def launch(args: list[str], nproc: int) -> dict:
    """``snag-dist ARGS`` as one process or under torchrun; wall time, peak RSS per rank, or the error line."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "snag_dist", *args]
    else:
        cmd = [sys.executable, "-m", "snag_dist", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watch = PeakRss(proc.pid)
    _, err = proc.communicate()
    rss = watch.stop()
    if proc.returncode != 0:
        lines = [x for x in err.strip().splitlines() if "error" in x.lower()] or err.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}", "rss": rss}
    return {"wall": time.time() - t0, "rss": rss}


def run_train(shards: Path, out: Path, task: str, nproc: int, backend: str, steps: int, extra: list[str]) -> dict:
    preset, sets = PRESET[task]
    sets = [*sets, f"data.shards={shards}", "data.mode=stream", f"train.max_steps={steps}", "train.epochs=1",
            "train.eval_every=0", "eval.test_at_end=false", f"engine.backend={backend}", *extra]
    args = ["train", "--config", preset, "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
    shutil.rmtree(out, ignore_errors=True)
    run = launch(args, nproc)
    if "error" in run:
        return {"error": run["error"]}
    record = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    return {"wall": run["wall"], "rss": run["rss"], **{k: record.get(k) for k in (
        "steps", "step_seconds", "rows_per_s", "data_wait_share", "time_to_first_step")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(PRESET), default="completion")
    parser.add_argument("--sizes", nargs="+", default=["100K", "1M"])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["accelerate"])
    parser.add_argument("--encoders", nargs="+", default=["preset"], help="preset | gat | embedding")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", default="/tmp/snag-bench-scale")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--json", default="", help="append result rows to this JSON-lines file")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| task | entities | encoder | procs | backend | time to 1st step s | step s (median) | rows/s | "
          "data wait | peak RSS per process GiB |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for text in args.sizes:
        n = size(text)
        shards = shards_for(work, args.task, n)
        for encoder in args.encoders:
            extra = list(args.set) + ([] if encoder == "preset" else [f"model.structure_encoder={encoder}"])
            for nproc in args.nproc:
                for backend in args.backends if nproc > 1 else args.backends[:1]:
                    res = run_train(shards, work / "run", args.task, nproc, backend, args.steps, extra)
                    row = {"task": args.task, "entities": n, "encoder": encoder, "nproc": nproc, "backend": backend,
                           "steps_asked": args.steps, **res}
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
                    if "error" in res:
                        print(f"| {args.task} | {text} | {encoder} | {nproc} | {backend} | FAILED: {res['error']} |")
                        continue
                    rss = " / ".join(f"{r / GIB:.2f}" for r in res["rss"])
                    print(f"| {args.task} | {text} | {encoder} | {nproc} | {backend} | {res['time_to_first_step']:.1f} | "
                          f"{res['step_seconds']:.3f} | {res['rows_per_s']:.0f} | {res['data_wait_share']:.1%} | "
                          f"{rss} |", flush=True)


if __name__ == "__main__":
    main()
