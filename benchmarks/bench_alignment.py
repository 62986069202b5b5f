"""Entity-alignment accuracy and speed on real DBP15K (issue: SNAG core + MMEA).

Runs the paper's configuration (hidden 300, batch 3,500, lr 5e-4, wd 1e-3, 30 % train links of which
10 % validation, CSLS k=3) for several variants and appends a markdown table to benchmarks/RESULTS.md:

  standard  : structure + relation, GMNM on, non-iterative
  iterative : + iterative learning (pseudo links) after --iterative-start epochs
  names     : structure + relation + names (all-MiniLM-L6-v2 embeddings of the entity names)
  no-gmnm   : standard with GMNM off
  -relation / -structure : standard with one modality removed

Usage:
  python benchmarks/bench_alignment.py --pair fr_en --epochs 200 --variants standard,no-gmnm,-relation
Shards are prepared on first use under shards/ (names need `--text minilm`).

Iterative variants on a short schedule: the phases are [base: iterative_start epochs, iterative: epochs -
iterative_start], so the iterative phase only runs when --epochs > --iterative-start. `--base-run RUN` starts
an iterative variant from a finished non-iterative run with the same pair, seed and base length (its final
checkpoint is rewound to "base phase done"), so the base phase is not trained again; e.g.
  python benchmarks/bench_alignment.py --pair fr_en --epochs 100 --iterative-start 50 --variants iterative \
      --base-run runs/bench/fr_en-standard-e50 --set task.alignment.pseudo_every=10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "DBP15K"

VARIANTS = {
    "standard": (["model.modalities=[structure,relation]"], False),
    "iterative": (["model.modalities=[structure,relation]", "task.alignment.iterative=true"], False),
    "names": (["model.modalities=[structure,relation,name]"], True),
    "names-iterative": (["model.modalities=[structure,relation,name]", "task.alignment.iterative=true"], True),
    "no-gmnm": (["model.modalities=[structure,relation]", "noise.enabled=false"], False),
    "-relation": (["model.modalities=[structure]"], False),
    "-structure": (["model.modalities=[relation]"], False),
    "names-no-gmnm": (["model.modalities=[structure,relation,name]", "noise.enabled=false"], True),
    "-names+structure": (["model.modalities=[relation,name]"], True),
}


def shards_for(pair: str, names: bool) -> Path:
    out = REPO / "shards" / f"dbp15k_{pair}{'_names' if names else ''}"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "snag_dist", "prepare", str(DATA / pair), "--out", str(out), "--quiet"]
        subprocess.run(cmd + (["--text", "minilm"] if names else []), check=True)
    return out


def continue_from(base: Path, run: Path, base_epochs: int) -> None:
    """Copy a finished non-iterative run into ``run`` with its last checkpoint marked "in phase 0, at its end":
    the resumed fit then tests the base phase, reloads its best weights and starts the iterative phase
    exactly as an uninterrupted run does at epoch ``base_epochs``."""
    if run.exists():
        return
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("tb", "plots", "summary.json"))
    ckpts = sorted((run / "checkpoints").glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    last = ckpts[-1]
    state = json.loads((last / "state.json").read_text())
    if state["fit"]["epoch"] != base_epochs:
        raise SystemExit(f"{base}: last checkpoint at epoch {state['fit']['epoch']}, iterative start is {base_epochs}")
    state["fit"].update(phase=0, results={})
    (last / "state.json").write_text(json.dumps(state, indent=1))


def run_variant(pair: str, variant: str, epochs: int, iterative_start: int, eval_every: int,
                extra: list[str], report_only: bool = False, base_run: str = "") -> dict:
    overrides, names = VARIANTS[variant]
    run = REPO / "runs" / "bench" / f"{pair}-{variant}-e{epochs}"
    if report_only:
        return collect(run, variant)
    sets = [f"data.shards={shards_for(pair, names)}", f"train.epochs={epochs}", f"train.eval_every={eval_every}",
            "task.alignment.iterative=false", f"task.alignment.iterative_start={iterative_start}",
            *overrides, *extra]
    cmd = [sys.executable, "-m", "snag_dist", "train", "--config", f"dbp15k_{pair}", "--out", str(run), "--quiet"]
    if base_run and "iterative=true" in " ".join(overrides):
        continue_from(REPO / base_run, run, iterative_start)
        cmd += ["--resume", "auto"]
    else:
        cmd += ["--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    return collect(run, variant)


def pseudo_precision(run: Path) -> str:
    """Pseudo links in the last checkpoint and the share of them that are held-out gold links."""
    from snag_dist.data.stream import read_all_rows
    from snag_dist.engine.checkpoint import load_task_state
    from snag_dist.tasks.alignment import pseudo_link_precision

    ckpts = sorted((run / "checkpoints").glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    pseudo = load_task_state(ckpts[-1]).get("pseudo") if ckpts else None
    if pseudo is None or len(pseudo) == 0:
        return "-"
    shards = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["shards"])
    gold = torch.from_numpy(read_all_rows(shards, "links/test"))
    return f"{len(pseudo):,} ({pseudo_link_precision(pseudo, gold):.3f})"


def collect(run: Path, variant: str) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    secs = [json.loads(x)["seconds"] for x in (run / "train.jsonl").read_text().splitlines()]
    return {"variant": variant, "test": summary["test"], "sec_per_epoch": statistics.median(secs),
            "best_epoch": summary["best_epoch"], "run": str(run.relative_to(REPO)), "pseudo": pseudo_precision(run)}


def table(pair: str, rows: list[dict]) -> str:
    lines = ["| variant | modalities / setting | phase | H@1 | H@10 | MRR | best epoch (valid) | s/epoch (median) "
             "| pseudo links at the end (precision vs test links) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(VARIANTS[r["variant"]][0])
        for phase, m in r["test"].items():
            lines.append(f"| {r['variant']} | {setting} | {phase} | {m['hits@1']:.4f} | {m['hits@10']:.4f} | "
                         f"{m['mrr']:.4f} | {m['best_epoch']} | {r['sec_per_epoch']:.2f} | {r['pseudo']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="fr_en", choices=["fr_en", "ja_en", "zh_en"])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--iterative-start", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--variants", default="standard,iterative,names,no-gmnm,-relation,-structure")
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    ap.add_argument("--base-run", default="", help="iterative variants: continue from this finished base run")
    args = ap.parse_args()
    rows = [run_variant(args.pair, v, args.epochs, args.iterative_start, args.eval_every, args.set,
                        args.report_only, args.base_run) for v in args.variants.split(",")]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = (f"\n## Alignment: DBP15K {args.pair} ({dt.date.today()})\n\n"
            f"Command: `{cmd}`  \nMachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch CPU, fp32. Schedule: {args.epochs} epochs"
            f" (iterative variants: iterative learning from epoch {args.iterative_start}); paper: 1,000 "
            f"(fr/ja) / 1,500 (zh) with iterative from 500/250. No images, no attributes (not available offline).\n\n"
            + table(args.pair, rows) + "\n")
    with open(args.results, "a") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
