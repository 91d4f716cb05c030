"""Embedding tables out of an (unsharded) model into a safetensors file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from torchrec.modules.embedding_modules import EmbeddingBagCollection


def export_tables(ebc: EmbeddingBagCollection, path: Path) -> dict[str, tuple[int, int]]:
    """fp32 tables by name; returns their shapes."""
    arrays = {
        cfg.name: np.ascontiguousarray(ebc.embedding_bags[cfg.name].weight.detach().cpu().numpy().astype(np.float32))
        for cfg in ebc.embedding_bag_configs()
    }
    save_file(arrays, str(path))
    return {k: (int(v.shape[0]), int(v.shape[1])) for k, v in arrays.items()}
