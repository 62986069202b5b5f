"""What a search leaves behind: one row per trial (best first) as CSV and a rich table, the best trial's
config as a YAML that ``snag-dist train --config`` takes unchanged, and plots.

A trial's status: ``completed`` (its run folder has ``summary.json``: ``train`` returned, including an
engine early stop on patience), ``stopped`` (the scheduler ended it: ASHA), or ``error``.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from snag_dist.config import Config, save_config
from snag_dist.errors import TrainingError
from snag_dist.fsio import atomic_open
from snag_dist.plots import save_figure
from snag_dist.tune.space import SearchSpace, apply

NOISE_KEYS = ("noise.noise_ratio", "noise.mask_ratio")


def _curve(result, metric: str) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    if df is None or metric not in df or "epochs" not in df:
        return []
    points = {int(e): float(v) for e, v in zip(df["epochs"], df[metric]) if not math.isnan(float(v))}
    return sorted(points.items())  # a retried trial may report an epoch twice: keep the last


def _status(result, curve: list[tuple[int, float]]) -> str:
    if result.error is not None:
        return "error"
    if (Path(result.path) / "run" / "summary.json").is_file():
        return "completed"
    return "stopped" if curve else "error"


def _last_line(error) -> str:
    """The exception line of a (remote) traceback, without terminal colours."""
    if error is None:
        return ""
    lines = [x for x in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def trial_rows(grid, cfg: Config, space: SearchSpace, metric: str) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        curve = _curve(result, metric)
        best_epochs, best = max(curve, key=lambda p: p[1]) if curve else (0, -math.inf)
        params = {p.key: result.config.get(p.key) for p in space.params}
        rows.append({
            "trial": Path(result.path).name,
            "status": _status(result, curve), metric: best, "best_epochs": best_epochs,
            "epochs": curve[-1][0] if curve else 0, "max_epochs": apply(cfg, space.fixed, params).train.epochs,
            "params": params, "run_dir": str(Path(result.path) / "run"),
            "error": _last_line(result.error), "curve": curve,
        })
    rows.sort(key=lambda r: (r["status"] == "error", -r[metric]))
    return rows


def write_best_config(rows: list[dict[str, Any]], cfg: Config, space: SearchSpace, path: Path) -> Path:
    best = next((r for r in rows if r["status"] != "error"), None)
    if best is None:
        raise TrainingError("no trial reported a validation metric: no best config")
    save_config(apply(cfg, space.fixed, best["params"]), path)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], space: SearchSpace, metric: str, path: Path) -> Path:
    header = ["rank", "trial", "status", metric, "best_epochs", "epochs", *space.keys(), "run_dir", "error"]
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for rank, r in enumerate(rows, 1):
            writer.writerow([rank, r["trial"], r["status"], r[metric], r["best_epochs"], r["epochs"],
                             *(r["params"][k] for k in space.keys()), r["run_dir"], r["error"]])
    return path


def print_table(rows: list[dict[str, Any]], space: SearchSpace, metric: str, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"search {out.name}: {len(rows)} trials, best first (valid {metric})")
    for col in ("#", "trial", "status", metric, "epochs", *space.keys()):
        table.add_column(col, justify="right" if col not in ("trial", "status") else "left")
    for rank, r in enumerate(rows, 1):
        table.add_row(str(rank), r["trial"], r["status"], f"{r[metric]:.4f}", f"{r['epochs']}/{r['max_epochs']}",
                      *(_fmt(r["params"][k]) for k in space.keys()))
    console = Console()
    console.print(table)
    console.print(f"best config: {out / 'best.yaml'}   table: {out / 'results.csv'}   plots: {out / 'plots'}")


def _value(row: dict[str, Any], cfg: Config, key: str) -> float:
    """A trial's value of ``key``: sampled, else the base config's."""
    if row["params"].get(key) is not None:
        return float(row["params"][key])
    section, field = key.split(".")
    return float(getattr(getattr(cfg, section), field))


def plot_search(rows: list[dict[str, Any]], space: SearchSpace, cfg: Config, metric: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["status"] != "error"]
    base = apply(cfg, space.fixed, {})
    fig, axes = plt.subplots(1, len(NOISE_KEYS), figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, NOISE_KEYS):
        for status, marker in (("completed", "o"), ("stopped", "x")):
            pts = [(_value(r, base, key), r[metric]) for r in ok if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status)
        ax.set(xlabel=key, title=f"best valid {metric} vs {key.split('.')[1]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend()
    written = [save_figure(fig, out_dir / "metric_vs_noise.png")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        if not r["curve"]:
            continue
        xs, ys = zip(*r["curve"])
        stopped = r["status"] == "stopped"
        line, = ax.plot(xs, ys, linestyle="--" if stopped else "-", marker=".", label=r["trial"])
        if stopped:
            ax.scatter([xs[-1]], [ys[-1]], marker="X", s=80, color=line.get_color(), zorder=3)
    ax.scatter([], [], marker="X", color="k", label="stopped early (scheduler)")
    ax.set(xlabel="epochs trained", ylabel=f"valid {metric}", title="trial learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    written.append(save_figure(fig, out_dir / "learning_curves.png"))
    return written
