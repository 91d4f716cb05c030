"""Plots a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(losses: list[float], eval_history: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.3, label="train loss (step)")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, label=f"train loss ({w}-step mean)")
    if eval_history:
        ax.plot([h["step"] for h in eval_history], [h["logloss"] for h in eval_history], "o-", label="holdout logloss")
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in eval_history], [h["auc"] for h in eval_history], "s--", color="tab:green", label="holdout AUC")
        ax2.set_ylabel("AUC")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("logloss")
    ax.legend(loc="upper right")
    ax.set_title("adsfm training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_curve(probs: np.ndarray, labels: np.ndarray, path: Path, title: str = "ROC") -> Path:
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    p, y = torch.from_numpy(np.asarray(probs, dtype=np.float64)), torch.from_numpy(np.asarray(labels)).long()
    fpr, tpr, _ = binary_roc(p, y)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr.numpy(), tpr.numpy(), label=f"AUC {float(binary_auroc(p, y)):.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_curve(probs: np.ndarray, labels: np.ndarray, path: Path, bins: int = 10) -> Path:
    """Mean label against mean prediction in equal-count bins (a reliability diagram)."""
    order = np.argsort(probs)
    groups = np.array_split(order, bins)
    pred = [float(np.mean(probs[g])) for g in groups if len(g)]
    real = [float(np.mean(labels[g])) for g in groups if len(g)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(pred, real, "o-")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"calibration ({bins} equal-count bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(labels: list[str], aucs: list[float | None], losses: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """A sweep at a glance: holdout AUC per run (best first) beside each run's training loss."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.45 * len(labels) + 1.5)))
    y = np.arange(len(labels))
    vals = [a if a is not None else np.nan for a in aucs]
    ax1.barh(y, vals, color="tab:blue")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    finite = [v for v in vals if np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax1.set_xlim(max(0.0, lo - 0.05 * max(hi - lo, 0.01) - 0.01), min(1.0, hi + 0.01))
    for i, v in enumerate(vals):
        if np.isfinite(v):
            ax1.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    ax1.set_xlabel("holdout AUC")
    for label, hist in losses.items():
        if hist:
            steps, values = zip(*sorted(hist), strict=True)
            ax2.plot(steps, values, marker=".", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss")
    ax2.legend(fontsize=7)
    fig.suptitle("adsfm sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
