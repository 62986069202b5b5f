"""Where GMNM matters: test MRR of trained completion runs when a modality is missing or wrong at test time.

Issue #20 asks to show where Gauss Modality Noise Masking helps when on vs off ties on clean data. This
evaluates the best checkpoint of each given run (full input path: `data.mode` full, or auto on a graph that fits) on the test split under:

  clean              the data as trained
  <m>-missing-50     modality m absent (present = False) for a seeded 50 % of the entities
  <m>-missing-100    modality m absent for every entity (the model falls back on its other tokens)
  <m>-swapped-30     modality m's features of a seeded 30 % of the entities replaced by those of other
                     random entities (present, but wrong: a noisy modality)

for every feature modality m of the run (names, relation bags). Same evaluator, filter and split as
training's test metrics; only the inputs change, and only in this benchmark (not a `snag-dist eval` option).
Runs are grouped by their folder name without the `-s<seed>` suffix; each group prints mean ± std.

    python benchmarks/bench_modality_robustness.py runs/bench/seeds_mkg_y/snag-mm-s{1,2,3} \
        runs/bench/seeds_mkg_y/snag-mm-off-s{1,2,3} --out runs/bench/robust_mkg_y.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from snag_dist.engine.checkpoint import load_checkpoint
from snag_dist.engine.run import build_task, find_checkpoint, load_model_state, run_config
from snag_dist.model.spec import STRUCTURE
from snag_dist.tasks.inputs import FullGraphInputs

CONDITIONS = (("missing", 0.5), ("missing", 1.0), ("swapped", 0.3))


def conditions_for(modalities: list[str]) -> list[tuple[str, str, float]]:
    return [("clean", "", 0.0)] + [(kind, m, p) for m in modalities if m != STRUCTURE for kind, p in CONDITIONS]


def evaluate_under(run: Path, seed: int) -> list[dict]:
    cfg = run_config(run)
    best = find_checkpoint(run, "best")
    state, _, _ = load_checkpoint(best)
    task = build_task(cfg, 0, 1, torch.device("cpu"))
    load_model_state(task.module, state, best)
    inputs = task.module.inputs
    if not isinstance(inputs, FullGraphInputs):
        sys.exit(f"{run}: needs the full input path")
    graph, spec_names = inputs.graph, task.module.model.spec.names
    saved_present, saved = graph.present.clone(), {k: v.clone() for k, v in graph.features.items()}
    n = graph.present.shape[0]
    rows = []
    for kind, m, p in conditions_for(task.module.model.modalities):
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=gen)[: round(p * n)]
        if kind == "missing":
            graph.present[chosen, spec_names.index(m)] = False
        elif kind == "swapped":
            donors = torch.randint(0, n, (len(chosen),), generator=gen)
            graph.features[m][chosen] = saved[m][donors]
            graph.present[chosen, spec_names.index(m)] = saved_present[donors, spec_names.index(m)]
        metrics = task.evaluate(task.module, "test")
        graph.present.copy_(saved_present)
        if kind == "swapped":
            graph.features[m].copy_(saved[m])
        name = "clean" if kind == "clean" else f"{m}-{kind}-{round(100 * p)}"
        rows.append({"run": str(run), "condition": name, "mrr": metrics["mrr"], "hits@1": metrics["hits@1"],
                     "hits@10": metrics["hits@10"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    group = lambda r: re.sub(r"-s\d+$", "", Path(r["run"]).name)  # noqa: E731
    groups = sorted({group(r) for r in rows})
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    clean = {r["run"]: r["mrr"] for r in rows if r["condition"] == "clean"}

    def cell(g: str, c: str) -> str:
        vals = [100 * r["mrr"] for r in rows if group(r) == g and r["condition"] == c]
        drops = [100 * (r["mrr"] - clean[r["run"]]) for r in rows if group(r) == g and r["condition"] == c]
        if not vals:
            return "–"
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        text = f"{statistics.mean(vals):.2f} ± {sd(vals):.2f}"
        return text if c == "clean" else f"{text} ({statistics.mean(drops):+.2f})"

    lines = ["| condition | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    lines += ["| " + c + " | " + " | ".join(cell(g, c) for g in groups) + " |" for c in conds]
    return "test MRR %, mean ± std over runs (change vs clean)\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="trained completion run folders")
    ap.add_argument("--seed", type=int, default=0, help="seed of the entities chosen per condition")
    ap.add_argument("--out", type=Path, required=True, help="JSONL of every (run, condition) row; a .md summary beside it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for run in args.runs for r in evaluate_under(run, args.seed)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summarize(rows)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
