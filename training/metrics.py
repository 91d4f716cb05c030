"""Ranking metrics on a holdout: AUC, logloss, normalized entropy, calibration."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc


def ranking_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NE is logloss divided by the entropy of the base rate: below 1 means better than predicting the rate."""
    p = probs.double().clamp(1e-7, 1 - 1e-7)
    y = labels.double()
    logloss = float(torch.nn.functional.binary_cross_entropy(p, y))
    rate = float(y.mean())
    base = -(rate * math.log(max(rate, 1e-12)) + (1 - rate) * math.log(max(1 - rate, 1e-12)))
    return {
        "auc": float(binary_auroc(p, y.long())),
        "logloss": logloss,
        "ne": logloss / base if base > 0 else float("nan"),
        "calibration": float(p.mean()) / rate if rate > 0 else float("nan"),
        "n": float(len(y)),
    }


def task_columns(a: np.ndarray) -> list[np.ndarray]:
    """One array per task: [n] is one task, [n, T] is T (a multi-task model's scores or labels)."""
    return [a] if a.ndim == 1 else [a[:, t] for t in range(a.shape[1])]


def task_metrics(probs: torch.Tensor | np.ndarray, labels: np.ndarray, tasks: list[str],
                 task_weights: list[float] | None = None) -> dict[str, float]:
    """ranking_metrics of one task, or of each of several (probs and labels [n, T]) with the first's as
    the headline."""
    p = torch.as_tensor(probs)
    y = torch.from_numpy(np.asarray(labels))
    if not tasks:
        return ranking_metrics(p, y)
    per = [ranking_metrics(p[:, t], y[:, t]) for t in range(len(tasks))]
    out = dict(per[0])
    weights = task_weights or [1.0] * len(tasks)
    out["loss"] = float(sum(w * m["logloss"] for w, m in zip(weights, per, strict=True)))
    for name, m in zip(tasks, per, strict=True):
        out.update({f"{name}_{k}": v for k, v in m.items() if k != "n"})
    return out
