"""Overlay one metric of several run folders (their metrics.jsonl) in one PNG, for RESULTS.md.

  python benchmarks/plot_runs.py --out benchmarks/plots/fr_en_gmnm.png \\
      "GMNM on=runs/bench/fr_en-iterative-e1000" "GMNM off=runs/bench/fr_en-no-gmnm-e500"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from snag_dist.plots import plot_compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--key", default="hits@1")
    ap.add_argument("--split", default="valid")
    a = ap.parse_args()
    runs = {}
    for item in a.runs:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            ap.error(f"{item!r}: expected LABEL=RUN_DIR with an existing folder")
        runs[label] = Path(path)
    print(plot_compare(runs, a.out, a.key, a.split))


if __name__ == "__main__":
    main()
