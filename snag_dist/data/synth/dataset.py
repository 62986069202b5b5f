"""``synth``: one dataset folder, written to a temp sibling and renamed into place at the end."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from snag_dist.data.synth.features import write_features, write_latent
from snag_dist.data.synth.layouts import write_mkgc, write_mmea
from snag_dist.data.synth.options import SynthOptions
from snag_dist.data.tempdirs import check_output, describe_removed, make_dir
from snag_dist.fsio import atomic_dir, remove_stale


def _reporter(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    start = time.monotonic()
    return lambda msg: print(f"synth [{time.monotonic() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _generate(tmp: Path, opts: SynthOptions, say: Callable[[str], None]) -> dict:
    write = write_mkgc if opts.task == "mkgc" else write_mmea
    counts, segments = write(tmp, opts, say)
    latent = tmp / "latent.f32.tmp"
    write_latent(latent, opts.seed, segments)
    counts["modalities"] = write_features(tmp / "features", opts, latent, say)
    latent.unlink()
    (tmp / "synth.json").write_text(json.dumps({"options": asdict(opts), "counts": counts}, indent=2) + "\n")
    return counts


def synth(out_dir: str | Path, opts: SynthOptions, progress: bool = False) -> dict:
    """Write a synthetic dataset to ``out_dir`` (which must not exist or be empty); returns counts."""
    out = Path(out_dir)
    check_output(out, overwrite=False, what="synth output", flag="")
    make_dir(out.parent, parents=True)
    stale = remove_stale(out)
    if stale:
        print(f"snag-dist synth: {describe_removed(stale)}", file=sys.stderr)
    with atomic_dir(out, replace_existing=False, mkdir=make_dir) as tmp:  # out: absent or empty (checked)
        counts = _generate(tmp, opts, _reporter(progress))
    return counts
