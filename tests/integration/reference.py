"""The independent reference for a served ranking: the eager PyTorch model on the training featurization
of one user with each candidate item swapped in (item-side features from that item's own rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def eager_scores(model: Any, fs: Any, df: pd.DataFrame, row: int, items: list[str]) -> dict[str, np.ndarray]:
    """Each item's probability (an array of one per task for a multi-task model) for the user of `row`."""
    item_rows = {str(df.item_id.iloc[i]): i for i in range(len(df))}
    side = {f.name: f.side for f in fs.spec.sparse}
    b = fs.take(np.array([row]))
    kjt_u = b.sparse_features.to_dict()
    out = {}
    for it in items:
        item_b = fs.take(np.array([item_rows[it]]))
        kjt_i = item_b.sparse_features.to_dict()
        kjt = KeyedJaggedTensor.from_jt_dict({k: (kjt_i[k] if side[k] == "item" else kjt_u[k]) for k in fs.sparse_names})
        dense = b.dense_features.clone()
        for j, d in enumerate(fs.spec.dense):
            if d.side == "item":
                dense[:, j] = item_b.dense_features[:, j]
        with torch.no_grad():
            out[it] = torch.sigmoid(model(dense, kjt))[0].double().numpy()
    return out
