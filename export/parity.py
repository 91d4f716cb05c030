"""Does the bundle score like the eager model? Same holdout rows through both, max abs difference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.manifest import ParitySpec
from serving.ranker import Bag, Ranker
from training.data import FeatureSet


class ParityError(RuntimeError):
    pass


@torch.no_grad()
def check_parity(model: nn.Module, ranker: Ranker, fs: FeatureSet, rows: int, tolerance: float) -> ParitySpec:
    idx = fs.holdout_idx[:rows] if len(fs.holdout_idx) else fs.train_idx[:rows]
    batch = fs.take(idx)
    model.eval()
    eager = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).double().numpy()
    kjt = batch.sparse_features.to_dict()
    bags = {name: Bag(jt.values().numpy(), jt.lengths().numpy()) for name, jt in kjt.items()}
    exported = ranker.score_indexed(batch.dense_features.numpy(), bags)
    diff = float(np.max(np.abs(eager - exported)))
    return ParitySpec(rows=len(idx), max_abs_diff=diff, tolerance=tolerance, passed=diff <= tolerance)


def require_parity(p: ParitySpec) -> None:
    if not p.passed:
        raise ParityError(
            f"parity check failed: max |eager - exported| = {p.max_abs_diff:.3g} over {p.rows} holdout rows "
            f"> tolerance {p.tolerance:.1g}; the bundle is not registered"
        )
