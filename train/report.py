"""Plots and small file helpers shared by ``train.fit``, ``train.scst`` and ``train.evaluate``.

    python -m train.report runs/flickr8k-lite0/metrics.jsonl   # redraw the two curves of a run

Plots use matplotlib's Agg backend (no display needed) and are written atomically.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from storyteller.fileio import atomic_path


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_curves(history: list[dict[str, Any]], loss_png: str | os.PathLike, metric_png: str | os.PathLike) -> None:
    """Draw train/val loss and val BLEU-4 / CIDEr-D per epoch.

    Args:
        history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``, ``bleu4``, ``cider``
            (the lines of metrics.jsonl).
        loss_png: output path of the loss curve.
        metric_png: output path of the metric curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (dropout on)")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    best = [h for h in history if h.get("best_epoch") == h["epoch"]]
    if best:
        ax.axvline(best[-1]["epoch"], color="grey", ls=":", label=f"best epoch {best[-1]['epoch']}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy per token")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, Path(loss_png))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["bleu4"] for h in history], "o-", color="tab:green", label="BLEU-4")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("BLEU-4 (greedy)")
    ax2 = ax.twinx()  # CIDEr-D lives on a 0..10 scale, BLEU-4 on 0..1
    ax2.plot(epochs, [h["cider"] for h in history], "s-", color="tab:purple", label="CIDEr-D")
    ax2.set_ylabel("CIDEr-D (greedy)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    ax.set_title("Validation captions")
    ax.grid(alpha=0.3)
    _save_figure(fig, Path(metric_png))
    plt.close(fig)


def plot_scst_curves(history: list[dict[str, Any]], reward_png: str | os.PathLike, metric_png: str | os.PathLike) -> None:
    """Draw SCST's mean sample reward and validation CIDEr-D (greedy and beam) per epoch.

    Args:
        history: the lines of an scst metrics.jsonl (epoch 0 is the starting model, without a reward).
        reward_png: output path of the reward curve.
        metric_png: output path of the validation curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained = [h for h in history if "mean_reward" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["epoch"] for h in trained], [h["mean_reward"] for h in trained], "o-", label="mean sample reward")
    if any("mean_greedy_reward" in h for h in trained):
        ax.plot([h["epoch"] for h in trained], [h.get("mean_greedy_reward") for h in trained], "s-", label="greedy reward")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward (training images)")
    ax.set_title("SCST reward")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, Path(reward_png))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["greedy_cider"] for h in history], "o-", label="greedy")
    ax.plot(epochs, [h["beam_cider"] for h in history], "s-", label="beam (default decoding)")
    best = [h for h in history if h.get("best_epoch") == h["epoch"]]
    if best:
        ax.axvline(best[-1]["epoch"], color="grey", ls=":", label=f"best epoch {best[-1]['epoch']}")
    ax.set_xlabel("epoch (0: starting model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation CIDEr-D")
    ax.set_title("Validation captions")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, Path(metric_png))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Redraw loss_curve.png and metric_curve.png beside a metrics.jsonl.

    Args:
        argv: ``[path/to/metrics.jsonl]``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m train.report RUN_DIR/metrics.jsonl")
    path = Path(argv[0])
    history = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    plot_curves(history, path.parent / "loss_curve.png", path.parent / "metric_curve.png")


if __name__ == "__main__":
    main()
