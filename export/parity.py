"""Does the bundle score like the eager model? The same holdout rows through both.

fp32 bundles must match within a tolerance on every score; bundles with quantized tables may differ by
quantization error, so they are held to the holdout AUC they lose against the eager fp32 model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.manifest import ParitySpec
from serving.ranker import Bag, Ranker
from training.data import FeatureSet
from training.loop import predict
from training.metrics import ranking_metrics


class ParityError(RuntimeError):
    pass


def bundle_probs(ranker: Ranker, fs: FeatureSet, idx: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The bundle's probabilities for already featurized rows (the serving lookup + ONNX path)."""
    out = []
    for s in range(0, len(idx), batch):
        b = fs.take(idx[s : s + batch])
        bags = {k: Bag(jt.values().numpy(), jt.lengths().numpy()) for k, jt in b.sparse_features.to_dict().items()}
        out.append(ranker.score_indexed(b.dense_features.numpy(), bags))
    return np.concatenate(out) if out else np.zeros(0)


def parity_rows(fs: FeatureSet, rows: int) -> np.ndarray:
    """The holdout rows parity is checked on (all of them when rows is 0)."""
    idx = fs.holdout_idx if len(fs.holdout_idx) else fs.train_idx
    return idx[:rows] if rows else idx


@torch.no_grad()
def eager_probs(model: nn.Module, fs: FeatureSet, idx: np.ndarray) -> np.ndarray:
    """The eager PyTorch model's probabilities (the reference) for rows `idx`."""
    model.eval()
    return predict(model, fs, idx, 4096).double().numpy()


def check_parity(
    eager: np.ndarray, ranker: Ranker, fs: FeatureSet, idx: np.ndarray, tolerance: float, auc_margin: float = 0.002,
    quantized: bool = False,
) -> tuple[ParitySpec, np.ndarray]:
    """The parity verdict for the eager probabilities of rows `idx`, and the bundle's probabilities on
    them (for the model card)."""
    exported = bundle_probs(ranker, fs, idx)
    return judge(eager, exported, fs.labels[idx], tolerance, auc_margin, quantized), exported


def judge(eager: np.ndarray, exported: np.ndarray, labels: np.ndarray, tolerance: float, auc_margin: float,
          quantized: bool, other_diff: float = 0.0) -> ParitySpec:
    """The verdict on the same rows' eager and exported probabilities: an fp32 bundle must match within
    `tolerance` (also `other_diff`, a difference measured elsewhere), a quantized one keep the holdout AUC
    within `auc_margin`."""
    auc_eager = ranking_metrics(torch.from_numpy(eager), torch.from_numpy(labels))["auc"]
    auc_bundle = ranking_metrics(torch.from_numpy(exported), torch.from_numpy(labels))["auc"]
    diff = max(float(np.max(np.abs(eager - exported))), other_diff)
    drop = auc_eager - auc_bundle
    return ParitySpec(
        rows=len(eager), max_abs_diff=diff, tolerance=tolerance, auc_eager=auc_eager, auc_bundle=auc_bundle,
        auc_drop=drop, auc_margin=auc_margin, quantized=quantized,
        passed=drop <= auc_margin if quantized else diff <= tolerance,
    )


def require_parity(p: ParitySpec) -> None:
    if not p.passed:
        raise ParityError(f"parity check failed: {p.reason()}; the bundle is not registered")
