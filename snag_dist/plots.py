"""Plots of a run folder: losses, validation metric over epochs, mean modality weights."""

from __future__ import annotations

from pathlib import Path

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


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
