"""Ranking metrics on a holdout: AUC, logloss, normalized entropy, calibration."""

from __future__ import annotations

import math

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
