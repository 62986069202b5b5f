"""``make demo``: the main job end to end on the real sample shipped in ``data/sample``.

prepare shards -> verify -> stream one epoch through 2 processes (torchrun, gloo) -> train SNAG with
2 processes (alignment, then completion; Accelerate DDP or DeepSpeed) -> evaluate -> checkpoint ->
export -> summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from snag_dist.engine.registry import BACKENDS
from snag_dist.report import print_rows

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"demo step failed (exit {res.returncode}): {' '.join(cmd)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--epochs", type=int, default=0, help="override the preset's epochs (0 = keep)")
    ap.add_argument("--backend", choices=BACKENDS.names(), default="accelerate",
                    help="engine.backend of the two training runs")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, gloo on CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    py = [sys.executable, "-m", "snag_dist"]
    shards = out / "shards"
    rows: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for name, text in (("dbp15k_fr_en_mini", "minilm"), ("db15k_mini", "minilm")):
        _run([*py, "prepare", str(SAMPLE / name), "--out", str(shards / name), "--text", text, "--overwrite", "--quiet"])
        _run([*py, "verify", str(shards / name), "--quiet"])
    report = out / "stream.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "snag_dist",
          "stream", str(shards / "dbp15k_fr_en_mini"), "--workers", "2", "--out", str(report)],
         env={"OMP_NUM_THREADS": "1"})
    stream = json.loads(report.read_text())[0]
    rows.append(("stream: 2 ranks x 2 workers", f"{stream['entities']:,} entities exactly once, "
                 f"{sum(stream['mib_per_s_per_rank']) / 2:.1f} MiB/s/rank"))
    extra = ["--set", f"train.epochs={args.epochs}"] if args.epochs else []
    trainer = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "snag_dist", "train", "--overwrite", "--set", f"engine.backend={args.backend}"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # the processes share this machine's cores
    run = out / "alignment"
    _run([*trainer, "--config", "quickstart", "--shards", str(shards / "dbp15k_fr_en_mini"), "--out", str(run),
          *(extra or ["--set", "train.epochs=30"])], env=one_thread)
    summary = json.loads((run / "summary.json").read_text())
    for phase, m in summary["test"].items():
        rows.append((f"alignment test ({phase})",
                     f"H@1 {m['hits@1']:.3f}  H@10 {m['hits@10']:.3f}  MRR {m['mrr']:.3f}"))
    rows.append(("alignment run folder", str(run)))
    rows.append(("training", f"{args.nproc} processes, engine.backend={args.backend}"))
    crun = out / "completion"
    _run([*trainer, "--config", "quickstart_completion", "--shards", str(shards / "db15k_mini"), "--out",
          str(crun), "--set", f"train.epochs={args.epochs or 20}", "--set", "train.eval_every=5"], env=one_thread)
    csum = json.loads((crun / "summary.json").read_text())
    for phase, m in csum["test"].items():
        rows.append((f"completion test ({phase})", f"MRR {m['mrr']:.3f}  H@1 {m['hits@1']:.3f}  "
                     f"H@3 {m['hits@3']:.3f}  H@10 {m['hits@10']:.3f}"))
    shutil.rmtree(out / "export", ignore_errors=True)  # the demo is re-runnable
    _run([*py, "export", str(run), "--out", str(out / "export")])
    rows.append(("exported embeddings", str(out / "export" / "embeddings.safetensors")))
    rows.append(("total time", f"{time.perf_counter() - t0:.0f} s"))
    print_rows("snag-dist demo (real DBP15K FR-EN / DB15K sample)", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
