"""Training-side verbs: train, eval (export and tune register here too)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from snag_dist.cli_common import add_out


def _cmd_train(args: argparse.Namespace) -> int:
    from snag_dist.config import load_config
    from snag_dist.engine.run import train
    from snag_dist.report import print_rows

    overrides = list(args.set or [])
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    cfg = load_config(args.config, overrides)
    summary = train(cfg, args.out, resume=args.resume == "auto", progress=not args.quiet, overwrite=args.overwrite)
    rows = [("best epoch (valid)", str(summary["best_epoch"])), ("best valid", f"{summary['best_valid']:.4f}")]
    for phase, metrics in summary["test"].items():
        rows += [(f"test {phase} {k}", f"{v:.4f}") for k, v in metrics.items()
                 if k in ("hits@1", "hits@3", "hits@10", "mrr")]
    if int(os.environ.get("RANK", "0")) == 0:
        print_rows(f"{cfg.name}: {args.out}", rows)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from snag_dist.engine.run import evaluate_run
    from snag_dist.fsio import atomic_write_json
    from snag_dist.report import print_rows

    results = evaluate_run(args.run_dir, tuple(args.splits.split(",")), args.set, args.checkpoint)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the same result
        return 0
    rows = [(f"{split} {k}", f"{v:.4f}" if isinstance(v, float) else str(v))
            for split, m in results.items() for k, v in m.items()]
    print_rows(f"eval {args.run_dir}", rows)
    if args.out:
        atomic_write_json(Path(args.out), results, indent=1)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train SNAG on prepared shards")
    p.add_argument("--config", required=True, help="YAML file or preset name (e.g. quickstart, dbp15k_fr_en)")
    add_out(p, "run folder (config, checkpoints, metrics, plots, summary)")
    p.add_argument("--shards", default="", help="shortcut for --set data.shards=DIR")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. train.lr=1e-4")
    p.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from the last checkpoint in --out (a fresh start when there is none); the "
                        "config must match the run's except keys a resume may change (README: resume). never "
                        "(default): a fresh run, refused if --out already holds checkpoints (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints, metrics and plots of a run already in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint (under torchrun: sharded over the processes)")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--splits", default="valid,test", metavar="SPLIT[,SPLIT...]",
                   help="comma-separated splits to evaluate (default: valid,test)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override of the run's config, e.g. eval.protocol=topk")
    p.add_argument("--checkpoint", default="best",
                   help="checkpoint folder name under RUN_DIR/checkpoints, e.g. best (default) or epoch_3")
    add_out(p, "also write the metrics to this JSON file (default: printed only)", metavar="FILE", required=False,
            legacy_option="--json")
    p.set_defaults(fn=_cmd_eval)


def _cmd_export(args: argparse.Namespace) -> int:
    from snag_dist.export import export_run

    out = export_run(args.run_dir, args.out, args.checkpoint)
    print(f"wrote {out}/embeddings.safetensors and embeddings.json")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="entity embeddings of a run as safetensors + JSON")
    p.add_argument("run_dir", help="run folder written by train")
    add_out(p, "folder to write embeddings.safetensors and embeddings.json to", legacy_positional=True)
    p.add_argument("--checkpoint", default="best",
                   help="checkpoint folder name under RUN_DIR/checkpoints, e.g. best (default) or epoch_3")
    p.set_defaults(fn=_cmd_export)


REGISTER: list[Callable] = [_add_train, _add_eval, _add_export]
