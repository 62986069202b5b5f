"""``snag-dist`` command line: the only place argv is read. Errors print on one line, exit 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import fields

from snag_dist.cli_common import add_out, resolve_out, take_positional_out
from snag_dist.errors import SnagError

Handler = Callable[[argparse.Namespace], int]


def _cmd_prepare(args: argparse.Namespace) -> int:
    from snag_dist.data.prepare import PrepareOptions, prepare
    from snag_dist.report import print_manifest

    opts = PrepareOptions(**{f.name: getattr(args, f.name) for f in fields(PrepareOptions) if hasattr(args, f.name)})
    manifest = prepare(args.dataset_dir, args.out, opts, show_progress=not args.quiet)
    print_manifest(manifest, args.out)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from snag_dist.data.verify import verify

    report = verify(args.shards_dir, deep=not args.fast, progress=not args.quiet)
    print(f"OK {args.shards_dir}: {report.shards} shards, {report.samples} samples, "
          f"{report.bytes / 2**20:.1f} MiB match the manifest")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from snag_dist.data.synth import SynthOptions, parse_modalities, synth

    task = {"alignment": "mmea", "completion": "mkgc"}[args.task]  # the layouts' names in data/synth/layouts.py
    extra = {"modalities": parse_modalities(args.modalities)} if args.modalities else {}
    opts = SynthOptions(entities=args.entities, triples=args.triples, task=task, relations=args.relations,
                        seed=args.seed, **extra)
    summary = synth(args.out, opts, progress=not args.quiet)
    print(f"wrote synthetic {task} MMKG to {args.out}: {summary}")
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    from snag_dist.engine.stream_check import run_stream_check

    return run_stream_check(args.shards_dir, epochs=args.epochs, workers=args.workers,
                            batch_size=args.batch_size, seed=args.seed, out_json=args.out or "")


def _add_prepare(sub) -> None:
    from snag_dist.data.prepare import PrepareOptions

    d = PrepareOptions()  # the one place prepare's defaults live
    p = sub.add_parser("prepare", help="raw dataset -> WebDataset shards + manifest")
    p.add_argument("dataset_dir", help="raw dataset folder (alignment or completion layout, see README)")
    add_out(p, "shard folder to write (manifest.json + shards)", legacy_positional=True)
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="entities per entity shard")
    p.add_argument("--block-size", type=int, default=d.block_size, help="triples/links per block sample")
    p.add_argument("--min-shards", type=int, default=d.min_shards,
                   help="at least this many shards per split (ranks x workers)")
    p.add_argument("--relation-topk", type=int, default=d.relation_topk,
                   help="relation-bag size (0 = no relation modality)")
    p.add_argument("--text", default=d.text, metavar="{none,minilm,chargram}",
                   help="name features: none, all-MiniLM-L6-v2 (offline package) or character n-grams")
    p.add_argument("--dtype", default=d.dtype, metavar="{float16,float32}", help="storage dtype of dense features")
    p.add_argument("--train-ratio", type=float, default=d.train_ratio, help="alignment: share of links for training")
    p.add_argument("--valid-ratio", type=float, default=d.valid_ratio,
                   help="alignment: share of training links for validation")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the link splits")
    p.add_argument("--allow-pickle", action="store_true", help="accept .pkl feature files (they can run code)")
    p.add_argument("--mask-nonfinite", action="store_true",
                   help="an entity with a NaN/inf feature value lacks that modality (default: an error)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_prepare)


def _add_data_verbs(sub) -> None:
    v = sub.add_parser("verify", help="check every shard against the manifest (sha256, counts)")
    v.add_argument("shards_dir", help="shard folder written by prepare (manifest.json + shards)")
    v.add_argument("--fast", action="store_true", help="size + sha256 only, skip counting samples")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(fn=_cmd_verify)
    s = sub.add_parser("synth", help="write a synthetic MMKG in the raw dataset format")
    add_out(s, "raw dataset folder to write", legacy_positional=True)
    s.add_argument("--entities", type=int, required=True, help="entities in all (alignment: split between the two KGs)")
    s.add_argument("--triples", type=int, required=True, help="target triple count (self loops and duplicates are dropped)")
    s.add_argument("--task", default="completion", choices=["alignment", "completion"],
                   help="two KGs with gold links (alignment) or one KG with triple splits (completion)")
    s.add_argument("--relations", type=int, default=200, help="relation types (alignment: per KG)")
    s.add_argument("--modalities", default="",
                   help="dense feature modalities as NAME:DIM[:COVERAGE],... "
                        "(default: image:256:0.7,name:384:1.0,attribute:128:0.9)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated graph and features")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=_cmd_synth)
    st = sub.add_parser("stream", help="stream every shard once per epoch on this rank (run under torchrun)")
    st.add_argument("shards_dir", help="shard folder written by prepare")
    st.add_argument("--epochs", type=int, default=1, help="passes over the shards")
    st.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    st.add_argument("--batch-size", type=int, default=1024, help="samples per batch")
    st.add_argument("--seed", type=int, default=0, help="seed of the shard shuffle")
    add_out(st, "JSON file rank 0 writes the gathered report to (default: no file)", metavar="FILE",
            required=False, legacy_option="--out-json")
    st.set_defaults(fn=_cmd_stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snag-dist", description="Distributed SNAG trainer for multi-modal KGs")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                help="what to do; `snag-dist VERB --help` for its options")
    _add_prepare(sub)
    _add_data_verbs(sub)
    for register in _extra_verbs():
        register(sub)
    return parser


def _extra_verbs() -> list[Callable]:
    """Verbs that live with their subsystem (training, evaluation, export, tuning)."""
    from snag_dist import cli_train, cli_tune

    return cli_train.REGISTER + cli_tune.REGISTER


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu") if not _has_cuda_hint() else None
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    extra = take_positional_out(args, extra)  # prepare/synth/export SRC OUT: the deprecated output spelling
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # what parse_args says
    try:
        resolve_out(args)
        return int(args.fn(args) or 0)
    except SnagError as exc:
        print(f"snag-dist {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"snag-dist {args.verb}: interrupted", file=sys.stderr)
        return 130


def _has_cuda_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


if __name__ == "__main__":
    raise SystemExit(main())
