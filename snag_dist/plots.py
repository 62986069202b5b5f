"""Plots of a run folder: losses, validation metric over epochs, mean modality weights."""

from __future__ import annotations

from pathlib import Path

from snag_dist.fsio import atomic_path
from snag_dist.logging import read_jsonl


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_jsonl(run_dir / "train.jsonl")
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") != "test"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in [k for k in train[0] if k.startswith("loss")]:
            ax.plot([r["epoch"] for r in train], [r[key] for r in train], label=key)
        ax.set(xlabel="epoch", ylabel="loss", title="training losses", yscale="log")
        ax.legend()
        written.append(save_figure(fig, out_dir / "losses.png"))
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in [k for k in ("hits@1", "hits@3", "hits@10", "mrr") if k in evals[0]]:
            ax.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        ax.set(xlabel="epoch", ylabel="metric", title="validation")
        ax.legend()
        written.append(save_figure(fig, out_dir / "metrics.png"))
    weights = [r for r in train if "modality_weights" in r]
    if weights:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in weights[0]["modality_weights"]:
            ax.plot([r["epoch"] for r in weights], [r["modality_weights"][name] for r in weights], label=name)
        ax.set(xlabel="epoch", ylabel="mean weight", title="modality weights (mean over entities)")
        ax.legend()
        written.append(save_figure(fig, out_dir / "modality_weights.png"))
    return written


def plot_compare(runs: dict[str, Path], out: Path, key: str = "hits@1", split: str = "valid") -> Path:
    """One panel of ``key`` over epochs for several runs (label -> run folder), from their metrics.jsonl.
    A run without that split/key is an error naming it, so a typo cannot give an empty plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run_dir in runs.items():
        rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("split") == split and key in r]
        if not rows:
            plt.close(fig)
            raise ValueError(f"{run_dir}/metrics.jsonl: no {split!r} rows with {key!r}")
        ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label)
    ax.set(xlabel="epoch", ylabel=f"{split} {key}", title=f"{split} {key} over epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi, temp file + rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:  # a reader never sees a half-written PNG
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
