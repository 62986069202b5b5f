"""Does the data path meet its targets: prepare of a 1M-entity MMKG in <= 2 GiB, streaming >= 200 MB/s?

For each size (default 100K and 1M entities, ~5 triples per entity, synth's default modalities
image/name/attribute plus the relation bag prepare derives: 4 modalities) it measures

- ``synth`` wall time (in process);
- ``prepare`` in a subprocess (``python -m snag_dist prepare SRC --out OUT --quiet``): wall time,
  entities/s, MB/s of shards written and the child's own peak RSS (``os.wait4``);
- streaming per process: MB/s of shard bytes and entities/s through ``EntityStream`` (in order and
  shuffled) with 0 DataLoader workers and with 2 workers (the ratio 2 vs 0 is printed: this
  machine has 2 cores, and the consumer shares them), and rows/s through ``RowStream`` for
  ``triples/train``;
- ``FeatureStore.open`` build time and random-id ``lookup`` throughput;
- for context: the webdataset reading alone (tar -> samples) and the time to the first batch.

Stream, lookup and prepare figures are medians of ``--repeats`` runs (shards are read from the page
cache: the files were just written and fit in RAM). Stream rows also give MB per CPU-second (this
process plus its DataLoader workers), which other work on the shared cores disturbs less than wall
time; the load average is recorded with the results. A table is printed and a markdown section with
the command, machine and date is appended to ``benchmarks/RESULTS.md``. Outputs go to ``--workdir``
(1M entities: ~2.5 GB of raw data + shards) and are deleted at the end unless ``--keep``.

    .venv/bin/python benchmarks/bench_data.py                       # 100K and 1M, the targets
    .venv/bin/python benchmarks/bench_data.py --sizes 100K --repeats 1 --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from snag_dist.data.manifest import load_manifest
from snag_dist.data.store import FeatureStore
from snag_dist.data.stream import EntityStream, RowStream, StreamConfig, make_loader
from snag_dist.seeding import numpy_rng

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MB = 1e6
GIB = 2**30
RSS_TARGET = 2 * GIB
STREAM_TARGET_MB_S = 200.0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (DataLoader workers are joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def median_of(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median wall and median CPU seconds over ``repeats`` calls."""
    runs = [timed(fn) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def run_prepare(src: Path, out: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one ``snag-dist prepare`` child process."""
    shutil.rmtree(out, ignore_errors=True)
    return run_child([sys.executable, "-m", "snag_dist", "prepare", str(src), "--out", str(out), "--quiet"])


def run_synth(src: Path, n: int, triples: int, seed: int) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one ``snag-dist synth`` child process (features are streamed)."""
    shutil.rmtree(src, ignore_errors=True)
    return run_child([sys.executable, "-m", "snag_dist", "synth", "--out", str(src), "--entities", str(n),
                      "--triples", str(triples), "--seed", str(seed), "--quiet"])


def run_child(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not every child's maximum
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[3]} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024  # Linux: kilobytes


def group_bytes(root: Path, prefix: str) -> int:
    manifest = load_manifest(root)
    return sum(s.bytes for g, v in manifest.shards.items() if g.startswith(prefix) for s in v)


def read_entities(root: Path, workers: int, shuffle: int, batch: int) -> None:
    """One epoch of entity batches as a trainer gets them (float32 features, dense relation bag)."""
    stream = EntityStream(root, StreamConfig(shuffle_buffer=shuffle, batch_size=batch))
    seen = sum(len(out["ids"]) for out in make_loader(stream, workers))
    assert seen == stream.manifest.num_entities, (seen, stream.manifest.num_entities)


def read_samples(root: Path) -> None:
    """Only the webdataset part: shards -> tar members grouped into samples, nothing decoded."""
    stream = EntityStream(root, StreamConfig())
    assert sum(1 for _ in stream._samples(0)) == sum(s.samples for s in stream.manifest.shards["entities"])


def first_batch(root: Path, shuffle: int, batch: int) -> None:
    next(iter(EntityStream(root, StreamConfig(shuffle_buffer=shuffle, batch_size=batch))))


def read_rows(root: Path, workers: int, shuffle: int, batch: int) -> None:
    stream = RowStream(root, "triples/train", StreamConfig(shuffle_buffer=shuffle, batch_size=batch))
    seen = sum(len(rows) for rows in make_loader(stream, workers))
    assert seen == stream.manifest.counts["triples"]["train"]


def time_store(root: Path, store_dir: Path) -> float:
    shutil.rmtree(store_dir, ignore_errors=True)
    start = time.perf_counter()
    FeatureStore.open(root, store_dir)
    return time.perf_counter() - start


def lookups(store: FeatureStore, batch: int, batches: int, seed: int) -> None:
    for row in numpy_rng(seed).integers(store.start, store.stop, size=(batches, batch)):
        store.lookup(row)


def bench_size(n: int, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Rows (what, value, note) for one size."""
    work = Path(args.workdir) / f"n{n}"
    src, out, store_dir = work / "raw", work / "shards", work / "store"
    rows: list[tuple[str, str, str]] = []
    triples = args.triples_per_entity * n
    if args.reuse and (src / "synth.json").is_file():
        rows.append(("synth", "reused", f"{src}"))
    else:
        wall, rss = run_synth(src, n, triples, args.seed)
        counts = json.loads((src / "synth.json").read_text())["counts"]
        rows += [("synth", f"{wall:.1f} s", f"{counts['triples']:,} triples"),
                 ("synth peak RSS", f"{rss / GIB:.2f} GiB", f"{'meets' if rss <= RSS_TARGET else 'MISSES'} <= 2 GiB")]
    runs = [run_prepare(src, out) for _ in range(args.repeats)]
    wall, rss = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
    ent_bytes, tri_bytes = group_bytes(out, "entities"), group_bytes(out, "triples/train")
    total = group_bytes(out, "")
    manifest = load_manifest(out)
    ok = "meets" if rss <= RSS_TARGET else "MISSES"
    rows += [
        ("prepare wall", f"{wall:.1f} s", f"median of {len(runs)}: {', '.join(f'{r[0]:.1f}' for r in runs)}"),
        ("prepare entities/s", f"{n / wall:,.0f}", f"{len(manifest.modalities)} modalities"),
        ("prepare MB/s written", f"{total / MB / wall:.0f}", f"{total / MB:,.0f} MB of shards"),
        ("prepare peak RSS", f"{rss / GIB:.2f} GiB", f"{ok} <= 2 GiB (max of {len(runs)})"),
    ]
    batch = args.batch_size
    for label, shuffle in (("in order", 0), (f"shuffle {args.shuffle}", args.shuffle)):
        base = None
        for workers in (0, 2):
            t, cpu = median_of(lambda w=workers, s=shuffle: read_entities(out, w, s, batch), args.repeats)
            mb_s = ent_bytes / MB / t
            note = f"{n / t:,.0f} entities/s; {ent_bytes / MB / cpu:.0f} MB per CPU-second"
            if workers == 0:
                base = mb_s
                note += f"; {'meets' if mb_s >= STREAM_TARGET_MB_S else 'MISSES'} >= 200 MB/s per process"
            else:
                note += f"; {mb_s / workers:.0f} MB/s per worker; 2 vs 0 workers: {mb_s / base:.2f}x"
            rows.append((f"EntityStream {label}, {workers} workers", f"{mb_s:.0f} MB/s", note))
    t, cpu = median_of(lambda: read_samples(out), args.repeats)
    rows.append(("tar -> samples only (wds, no decode)", f"{ent_bytes / MB / t:.0f} MB/s",
                 f"the reading share of EntityStream; {ent_bytes / MB / cpu:.0f} MB per CPU-second"))
    for shuffle in (0, args.shuffle):
        t, _ = median_of(lambda s=shuffle: first_batch(out, s, batch), args.repeats)
        rows.append((f"first batch, shuffle {shuffle}", f"{t * 1e3:.0f} ms", "stream start, incl. shuffle fill"))
    n_tri = manifest.counts["triples"]["train"]
    for workers in (0, 2):
        t, cpu = median_of(lambda w=workers: read_rows(out, w, args.shuffle // 8, 65536), args.repeats)
        rows.append((f"RowStream triples/train, {workers} workers", f"{tri_bytes / MB / t:.0f} MB/s",
                     f"{n_tri / t:,.0f} triples/s (batch 65536, shuffled); {tri_bytes / MB / cpu:.0f} MB per CPU-s"))
    builds = [time_store(out, store_dir) for _ in range(args.repeats)]
    rows.append(("FeatureStore.open build", f"{statistics.median(builds):.2f} s",
                 f"{n / statistics.median(builds):,.0f} entities/s"))
    store = FeatureStore.open(out, store_dir)
    lookups(store, batch, 5, args.seed)  # warm the page cache of the store files
    t, _ = median_of(lambda: lookups(store, batch, args.lookup_batches, args.seed), args.repeats)
    out_bytes = sum(4 * c.dim for c in store.layout.columns) * batch * args.lookup_batches
    rows.append(("FeatureStore.lookup", f"{batch * args.lookup_batches / t:,.0f} entities/s",
                 f"random ids, batch {batch}; {out_bytes / MB / t:.0f} MB/s of float32 out"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    try:  # platform.processor() is often empty on Linux VMs
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return (f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, platform.processor() '{platform.processor()}', "
            f"cpu '{model}', Python {platform.python_version()}")


def render(results: dict[str, list[tuple[str, str, str]]]) -> str:
    lines = ["| size | what | value | note |", "|---|---|---|---|"]
    for size, rows in results.items():
        lines += [f"| {size} | {what} | {value} | {note} |" for what, value, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["100K", "1M"], help="entity counts, e.g. 100K 1M")
    parser.add_argument("--triples-per-entity", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--shuffle", type=int, default=4096, help="shuffle_buffer of the shuffled stream")
    parser.add_argument("--lookup-batches", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/snag-bench-data")
    parser.add_argument("--reuse", action="store_true", help="reuse synth output left by --keep")
    parser.add_argument("--keep", action="store_true", help="keep the synth data and shards")
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    results, loads = {}, []
    for size in args.sizes:
        before = os.getloadavg()[0]
        results[size] = bench_size(parse_size(size), args)
        loads.append(f"{size}: {before:.1f} -> {os.getloadavg()[0]:.1f}")
        print(f"\n{size} entities")
        for what, value, note in results[size]:
            print(f"  {what:<40} {value:>20}  {note}")
    if args.no_results:
        return
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    command = " ".join([*threads, ".venv/bin/python", "benchmarks/bench_data.py", *sys.argv[1:]])
    if not RESULTS.exists():
        RESULTS.write_text("# snag-dist benchmark results\n")
    section = (f"\n## Data path (bench_data.py), {dt.date.today().isoformat()}\n\n"
               f"Command: `{command}`  \nMachine: {machine()}  \n"
               f"1-minute load average (other work shares the cores), start -> end: {'; '.join(loads)}\n\n"
               f"{render(results)}\n")
    with open(RESULTS, "a") as fh:
        fh.write(section)
    print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
