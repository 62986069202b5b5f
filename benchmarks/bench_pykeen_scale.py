"""PyKEEN RotatE at scale: training triples/s, filtered evaluation time and peak memory on a synth graph.

Question: at 1M entities, what training throughput (triples/s) does PyKEEN's RotatE reach at the
embedding size, negatives and batch of our completion preset (complex dim 128 = 256 real numbers
per entity like our hidden 256, 32 negatives, batch 1024), and what do its filtered evaluation time
and peak memory look like, or what fails and where?

Graph: ``snag-dist synth --task completion`` with ~4.5 triples per entity (the size convention of
bench_scale.py), structure only (synth insists on one feature modality: a 1-wide one with coverage
0 is written and ignored). The folder is reused when it exists. Layout: train.txt / valid.txt /
test.txt ("head<TAB>relation<TAB>tail", integer ids), entities.txt / relations.txt (one id a line),
entity2id.txt, features/, synth.json (options and counts).

PyKEEN is not a project dependency: it runs in a subprocess with the python of its own venv
(``--pykeen-python``), as in bench_completion.py's pykeen phase (RotatE, NSSALoss margin 12 /
temperature 2, SLCWATrainingLoop with a filtered bernoulli sampler, Adam). Phases in that process:
  load      the three TSV files (pandas);
  factory   TriplesFactory build (``--factory mapped``: from the integer ids, as bench_completion;
            ``path``: TriplesFactory.from_path, what a PyKEEN user with label files does);
  model     RotatE + SLCWATrainingLoop construction (automatic memory optimisation off: on CPU it
            would only probe; the batch is exactly --batch, no sub-batching);
  train     PyKEEN's own training loop, stopped by a callback after --warmup + --train-steps
            batches (an epoch at 1M is ~4.5M triples); a step is timed from one batch start to the
            next (data + negatives + forward + backward + Adam), CPU seconds via getrusage;
  eval      RankBasedEvaluator(filtered=True) on the first --eval-triples test triples, head and
            tail, filtered with train + valid + test; scaled to the full test split as
            fixed overhead + batch time x test / K. The batch and slice sizes PyKEEN actually used
            are recorded. On CPU PyKEEN's default eval batch is 32 (slice = all entities), and
            RotatE scores a batch against all N entities by materialising a (batch, N, dim)
            complex64 difference: 32 x 1M x 128 x 8 B = 30.5 GiB per batch at 1M (eval_diff_gib),
            more than this 23.5 GiB machine has. torch_max_mem (PyKEEN's OOM back-off) would halve
            the batch only for "DefaultCPUAllocator: not enough memory"; torch 2.13 says "can't
            allocate memory", so the RuntimeError ends the evaluation (pykeen 1.11.1,
            torch_max_mem 0.1.6). --eval-batch 4 (3.8 GiB) measures the time at a size that fits.
            Careful: a batch whose tensor is just under the free RAM is allocated and filled
            (batch 16 at 1M: 15 GiB on top of ~5 GiB of training state): refused unless --allow-big-eval.
The parent samples the PyKEEN process's RSS every 0.2 s (psutil, as bench_scale.py) and keeps the
peak per phase; the child also reports the kernel's ru_maxrss. An exception is caught in its phase
and recorded (type, message, innermost frames); a process killed by a signal (the OOM killer sends
SIGKILL) or by --timeout is recorded with the phase it was in. One JSON line per run goes to
--json (runs/bench/pykeen_scale.jsonl) and a markdown row is printed.

    python3 -m venv .venv-pykeen && .venv-pykeen/bin/pip install torch==2.13.0 \\
        && .venv-pykeen/bin/pip install pykeen torch==2.13.0
    .venv/bin/python benchmarks/bench_pykeen_scale.py --entities 1M --pykeen-python .venv-pykeen/bin/python \\
        --train-steps 30 --eval-triples 32 --timeout 3600                   # PyKEEN's defaults at eval
    .venv/bin/python benchmarks/bench_pykeen_scale.py --entities 1M --pykeen-python .venv-pykeen/bin/python \\
        --train-steps 30 --eval-triples 32 --eval-batch 4 --timeout 3600    # eval at a batch that fits
    .venv/bin/python benchmarks/bench_pykeen_scale.py --entities 10K --pykeen-python .venv-pykeen/bin/python \\
        --warmup 2 --train-steps 5 --eval-triples 32                         # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
TRIPLES_PER_ENTITY = 4.5
STRUCTURE_ONLY = "image:1:0"  # synth needs one modality; 1 wide, no entity has it

# Runs in the PyKEEN venv: argv[1] is a JSON config; events go to stdout, one JSON object a line.
PYKEEN_SCRIPT = r"""
import json, resource, sys, time, traceback
from pathlib import Path
T0 = time.perf_counter()
cfg = json.loads(sys.argv[1])


def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(event, **kw):
    print(json.dumps({"event": event, "t": round(time.perf_counter() - T0, 3), "maxrss": maxrss(), **kw}), flush=True)


def failed(phase, exc):
    frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-6:]]
    emit("error", phase=phase, type=type(exc).__name__, message=str(exc)[:600], where=frames)


emit("phase", name="import")
import numpy as np, pandas as pd, torch
import pykeen
import pykeen.evaluation.evaluator as pk_eval
from pykeen.evaluation import RankBasedEvaluator
from pykeen.losses import NSSALoss
from pykeen.models import RotatE
from pykeen.training import SLCWATrainingLoop
from pykeen.training.callbacks import TrainingCallback
from pykeen.triples import TriplesFactory

torch.set_num_threads(cfg["threads"])
emit("info", pykeen=pykeen.get_version(), torch=torch.__version__, threads=torch.get_num_threads(),
     import_s=time.perf_counter() - T0)
raw = Path(cfg["synth_dir"])

emit("phase", name="load")
start = time.perf_counter()
split = {s: pd.read_csv(raw / f"{s}.txt", sep="\t", header=None, dtype=np.int64).to_numpy() for s in ("train", "valid", "test")}
n_ent = sum(1 for _ in open(raw / "entities.txt"))
n_rel = sum(1 for _ in open(raw / "relations.txt"))
emit("load", load_s=time.perf_counter() - start, entities=n_ent, relations=n_rel,
     **{f"{s}_triples": len(t) for s, t in split.items()})

emit("phase", name="factory")
start = time.perf_counter()
try:
    if cfg["factory"] == "path":
        train_tf = TriplesFactory.from_path(raw / "train.txt")
        maps = dict(entity_to_id=train_tf.entity_to_id, relation_to_id=train_tf.relation_to_id)
        tri = {"train": train_tf.mapped_triples,
               **{s: TriplesFactory.from_path(raw / f"{s}.txt", **maps).mapped_triples for s in ("valid", "test")}}
    else:
        tri = {s: torch.from_numpy(t) for s, t in split.items()}
        train_tf = TriplesFactory(mapped_triples=tri["train"], entity_to_id={str(i): i for i in range(n_ent)},
                                  relation_to_id={str(i): i for i in range(n_rel)})
except Exception as exc:
    failed("factory", exc)
    sys.exit(3)
del split
emit("factory", factory_s=time.perf_counter() - start, factory_entities=train_tf.num_entities,
     factory_relations=train_tf.num_relations)

emit("phase", name="model")
start = time.perf_counter()
try:
    torch.manual_seed(cfg["seed"])
    model = RotatE(triples_factory=train_tf, embedding_dim=cfg["dim"],
                   loss=NSSALoss(margin=cfg["margin"], adversarial_temperature=cfg["adv_temperature"]),
                   random_seed=cfg["seed"])
    loop = SLCWATrainingLoop(model=model, triples_factory=train_tf,
                             optimizer=torch.optim.Adam(model.parameters(), lr=cfg["lr"]),
                             negative_sampler=cfg["sampler"],
                             negative_sampler_kwargs=dict(num_negs_per_pos=cfg["negatives"], filtered=cfg["filtered"]),
                             automatic_memory_optimization=False)
except Exception as exc:
    failed("model", exc)
    sys.exit(3)
emit("model", model_s=time.perf_counter() - start, parameters=sum(p.numel() for p in model.parameters()))


class StopTraining(Exception):
    # not a RuntimeError / MemoryError: PyKEEN's loop lets it through untouched
    pass


class StepClock(TrainingCallback):
    # pre_batch of batch i+1 comes after batch i's optimizer step: the gap is one full step
    def __init__(self, total):
        super().__init__()
        self.total, self.times, self.cpus, self.sizes = total, [], [], []

    def pre_batch(self, **kwargs):
        self.times.append(time.perf_counter())
        self.cpus.append(cpu())
        done = len(self.times) - 1
        if done:
            emit("step", i=done, step_s=self.times[-1] - self.times[-2])
        if done == self.total:
            raise StopTraining

    def on_batch(self, epoch, batch, batch_loss, **kwargs):
        self.sizes.append(SLCWATrainingLoop._get_batch_size(batch))
        self.last_loss = batch_loss


emit("phase", name="train")
warm, steps = cfg["warmup"], cfg["steps"]
clock = StepClock(warm + steps)
start = time.perf_counter()
trained = steps == 0  # --train-steps 0: evaluate the freshly initialised model
try:
    if not trained:
        loop.train(triples_factory=train_tf, num_epochs=10**6, batch_size=cfg["batch"], use_tqdm=False,
                   use_tqdm_batch=False, callbacks=[clock])
        failed("train", RuntimeError("the training loop ended before the steps were done"))
except StopTraining:
    trained = True
except BaseException as exc:
    failed("train", exc)
if trained and steps:
    window = clock.times[warm + steps] - clock.times[warm]
    cpu_s = clock.cpus[warm + steps] - clock.cpus[warm]
    rows = sum(clock.sizes[warm:warm + steps])
    step_s = sorted(b - a for a, b in zip(clock.times[warm:warm + steps], clock.times[warm + 1:]))
    emit("train", first_step_s=clock.times[0] - start, warmup_s=clock.times[warm] - clock.times[0],
         steps=steps, step_s=window / steps, step_median_s=step_s[len(step_s) // 2], step_max_s=step_s[-1],
         triples_per_s=rows / window, cpu_s=cpu_s, cpu_s_per_1m_triples=cpu_s / rows * 1e6,
         cpu_util=cpu_s / window, batches_per_epoch=-(-train_tf.num_triples // cfg["batch"]), loss=clock.last_loss)
    del clock

k = min(cfg["eval_triples"], len(tri["test"]))
if k and trained:
    emit("phase", name="eval")
    calls = []
    inner = pk_eval._evaluate_batch

    def timed_batch(*args, **kwargs):
        t = time.perf_counter()
        batch = kwargs.get("batch", args[0] if args else None)
        call = {"batch": int(batch.shape[0]), "slice": kwargs.get("slice_size"), "target": str(kwargs.get("target"))}
        try:
            return inner(*args, **kwargs)
        except BaseException as exc:
            call["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            emit("eval_call_error", **call)
            raise
        finally:
            call["s"] = time.perf_counter() - t
            calls.append(call)

    pk_eval._evaluate_batch = timed_batch
    sample = tri["test"][:k]
    start = time.perf_counter()
    try:
        result = RankBasedEvaluator(filtered=True).evaluate(
            model, sample, additional_filter_triples=[tri["train"], tri["valid"], tri["test"]],
            batch_size=cfg["eval_batch"] or None, slice_size=cfg["eval_slice"] or None, use_tqdm=False)
        total = time.perf_counter() - start
        ok = [c for c in calls if "error" not in c]
        batch_s = sum(c["s"] for c in ok)
        overhead = total - sum(c["s"] for c in calls)
        emit("eval", eval_triples=k, eval_s=total, eval_batch_s=batch_s, eval_overhead_s=overhead,
             eval_full_s=overhead + batch_s * len(tri["test"]) / k, eval_failed_calls=len(calls) - len(ok),
             eval_batch_sizes=sorted({c["batch"] for c in ok}), eval_slice_sizes=sorted({c["slice"] for c in ok}, key=str),
             eval_first_batch=calls[0]["batch"] if calls else None, mrr_sample=float(result.get_metric("mrr")))
    except BaseException as exc:
        failed("eval", exc)
        emit("eval_partial", eval_s=time.perf_counter() - start, calls=calls[-20:])
emit("done")
"""


def size(text: str) -> int:
    text = text.upper()
    mult = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def ensure_synth(folder: Path, entities: int | None, seed: int) -> tuple[dict, float | None]:
    """Reuse ``folder`` if it holds a synth completion graph, else write one; returns (synth.json, seconds)."""
    meta = folder / "synth.json"
    if meta.is_file() and (folder / "train.txt").is_file():
        info = json.loads(meta.read_text())
        have = info["counts"]["entities"]
        if entities is not None and have != entities:
            sys.exit(f"{folder} holds {have} entities, not {entities}: pass another --synth-dir")
        return info, None
    if entities is None:
        sys.exit(f"{folder} has no synth graph: pass --entities to write one")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snag_dist", "synth", "--out", str(folder), "--entities", str(entities),
                    "--triples", str(int(TRIPLES_PER_ENTITY * entities)), "--task", "completion",
                    "--modalities", STRUCTURE_ONLY, "--seed", str(seed), "--quiet"], check=True, cwd=ROOT)
    return json.loads(meta.read_text()), time.perf_counter() - start


class PhaseRss:
    """Peak RSS of one process, sampled every 0.2 s, kept per phase (the phase the child last announced)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.phase, self.peaks = pid, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.2)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run_pykeen(python: str, cfg: dict, timeout: float, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"])}
    cmd = [python, "-c", PYKEEN_SCRIPT, json.dumps(cfg)]
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        watch = PhaseRss(proc.pid)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        row: dict = {"errors": []}
        steps_done, maxrss, step_times = 0, 0, []
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = ev.pop("event")
            maxrss = max(maxrss, ev.pop("maxrss", 0))
            if kind == "phase":
                watch.phase = row["phase_reached"] = ev["name"]
            elif kind == "step":
                steps_done = ev["i"]
                step_times.append(ev["step_s"])
            elif kind == "error":
                row["errors"].append(ev)
            elif kind == "eval_call_error":  # torch_max_mem retries smaller sizes after errors it takes for OOM
                row.setdefault("eval_call_errors", []).append(ev)
            elif kind == "eval_partial":
                row["eval_partial_s"], row["eval_partial_calls"] = ev["eval_s"], ev["calls"]
            elif kind == "done":
                row["phase_reached"] = "done"
            else:  # info, load, factory, model, train, eval: their fields go into the row
                ev.pop("t", None)
                row.update(ev)
        rc = proc.wait()
        timer.cancel()
    peaks = watch.stop()
    row.update(wall_s=time.perf_counter() - start, returncode=rc, steps_done=steps_done, maxrss_gib=maxrss / GIB,
               peak_rss_gib=max(peaks.values(), default=0) / GIB,
               peak_rss_by_phase_gib={k: round(v / GIB, 3) for k, v in peaks.items()})
    timed = sorted(step_times[cfg["warmup"]:])
    if "triples_per_s" not in row and timed:  # stopped early: what the finished steps took
        row["partial_step_median_s"] = timed[len(timed) // 2]
    if timed_out.is_set():
        row["errors"].append({"phase": row.get("phase_reached"), "type": "Timeout",
                              "message": f"killed after --timeout {timeout:g} s"})
    elif rc != 0 and not row["errors"]:
        tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-3:]
        what = (f"killed by signal {-rc}" + (" (SIGKILL: the kernel OOM killer? see dmesg)" if rc == -9 else "")
                if rc < 0 else f"exit {rc}")
        row["errors"].append({"phase": row.get("phase_reached"), "type": "ProcessDied", "message": what,
                              "stderr_tail": tail})
    row["status"] = "ok" if rc == 0 and not row["errors"] and row.get("phase_reached") == "done" else "failed"
    return row


def fmt(value, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def table_row(r: dict) -> str:
    rss = r.get("peak_rss_by_phase_gib", {})
    status = r["status"] if not r["errors"] else "; ".join(
        f"{e['phase']}: {e['type']}: {e['message'].split('err == 0. ')[-1][:110]}"
        + (f" ({e['where'][-1]})" if e.get("where") else "") for e in r["errors"])
    ev = f"{fmt(r.get('eval_s'))} (K={r.get('eval_triples', '-')}, b={r.get('eval_batch_sizes', '-')})"
    return (f"| {r['entities']:,} | {fmt(r.get('train_triples'), ',')} | {r.get('pykeen', '-')} | {r['dim']} "
            f"({2 * r['dim']} real) | {r['negatives']} | {r['batch']} | {fmt(r.get('factory_s'), '.2f')} | "
            f"{fmt(r.get('first_step_s'), '.2f')} | {fmt(r.get('step_s'), '.3f')} | {fmt(r.get('triples_per_s'), ',.0f')} | "
            f"{fmt(r.get('cpu_s_per_1m_triples'), ',.0f')} | {ev} | {fmt(r.get('eval_full_s'), ',.0f')} | "
            f"{rss.get('train', 0):.2f} / {rss.get('eval', 0):.2f} / {r['peak_rss_gib']:.2f} | {status} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=size, default=None, help="e.g. 100K, 1M (needed unless --synth-dir exists)")
    ap.add_argument("--synth-dir", default="", help="synth graph folder (default runs/bench/pykeen-scale/synth-N)")
    ap.add_argument("--pykeen-python", default=".venv-pykeen/bin/python", help="python of a venv with pykeen")
    ap.add_argument("--dim", type=int, default=128, help="complex RotatE dim (2x real numbers per entity)")
    ap.add_argument("--negatives", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5, help="training batches before the timed ones")
    ap.add_argument("--train-steps", type=int, default=50,
                    help="timed training batches (0 = no training: evaluate the initial model, no Adam state)")
    ap.add_argument("--eval-triples", type=int, default=64, help="test triples K for PyKEEN's evaluator (0 = skip)")
    ap.add_argument("--eval-batch", type=int, default=0, help="evaluator batch size (0 = PyKEEN's default)")
    ap.add_argument("--eval-slice", type=int, default=0, help="evaluator slice size (0 = PyKEEN's default)")
    ap.add_argument("--allow-big-eval", action="store_true",
                    help="run an eval batch whose score tensor fits in RAM but not in 60 %% of what is available")
    ap.add_argument("--factory", choices=["mapped", "path"], default="mapped",
                    help="mapped: TriplesFactory from the integer ids; path: TriplesFactory.from_path")
    ap.add_argument("--sampler", default="bernoulli", help="PyKEEN negative sampler (basic | bernoulli)")
    ap.add_argument("--unfiltered-negatives", action="store_true", help="PyKEEN's sampler without its filterer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the PyKEEN process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before the PyKEEN process is killed")
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench" / "pykeen_scale.jsonl"))
    args = ap.parse_args()

    folder = Path(args.synth_dir) if args.synth_dir else None
    if folder is None:
        if args.entities is None:
            ap.error("pass --entities or --synth-dir")
        folder = ROOT / "runs" / "bench" / "pykeen-scale" / f"synth-{args.entities}"
    folder = folder.resolve()
    info, synth_s = ensure_synth(folder, args.entities, args.seed)
    n = info["counts"]["entities"]
    cfg = {"synth_dir": str(folder), "dim": args.dim, "negatives": args.negatives, "batch": args.batch,
           "warmup": args.warmup, "steps": args.train_steps, "eval_triples": args.eval_triples,
           "eval_batch": args.eval_batch, "eval_slice": args.eval_slice, "factory": args.factory,
           "sampler": args.sampler, "filtered": not args.unfiltered_negatives, "lr": args.lr, "margin": 12.0,
           "adv_temperature": 2.0, "threads": args.threads, "seed": args.seed}
    log = Path(args.json).resolve().parent / f"pykeen_scale-{n}.stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    mem = psutil.virtual_memory()
    row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "entities": n,
           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                      f"{mem.total / GIB:.1f} GiB RAM, {mem.available / GIB:.1f} GiB available at start",
           "synth_s": synth_s, **{k: v for k, v in cfg.items() if k != "synth_dir"},
           "synth_dir": rel(folder)}
    eval_b = min(args.eval_batch or 32, args.eval_triples, info["counts"]["test"])
    row["eval_diff_gib"] = eval_b * n * args.dim * 8 / GIB  # (batch, N, dim) complex64 per scored batch
    if args.eval_triples and 0.6 * mem.available / GIB < row["eval_diff_gib"] < mem.total / GIB \
            and not args.allow_big_eval:
        # bigger than RAM: refused at once (recorded); in between: filled, and the OOM killer may pick any process
        ap.error(f"an eval batch of {eval_b} needs a {row['eval_diff_gib']:.1f} GiB tensor with "
                 f"{mem.available / GIB:.1f} GiB available: lower --eval-batch or pass --allow-big-eval")
    row.update(run_pykeen(args.pykeen_python, cfg, args.timeout, log))
    row["stderr_log"] = rel(log)
    with open(args.json, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print("| entities | train triples | PyKEEN | dim | neg | batch | factory s | 1st step s | step s | "
          "triples/s | CPU s / 1M triples | eval s (K, batch) | full test eval s (extrap.) | "
          "peak RSS GiB train / eval / all | status |\n" + "|---" * 15 + "|")
    print(table_row(row), flush=True)


if __name__ == "__main__":
    main()
