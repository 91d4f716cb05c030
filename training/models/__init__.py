"""Ranking models: a sparse arch built on the meta device + a dense arch. They know nothing of parallelism."""

from __future__ import annotations

import torch
from torch import nn

from training.config import ModelConfig

MODELS = ("dlrm", "hstu")


def features_by_table(spec: dict) -> dict[str, list[str]]:
    """Each embedding table of the data spec with the features that look it up, in spec order (raw
    features have no table)."""
    tables: dict[str, list[str]] = {}
    for f in spec["sparse"]:
        if not f.get("raw"):
            tables.setdefault(f["table"], []).append(f["name"])
    return tables


def build_model(spec: dict, cfg: ModelConfig, device: torch.device | str = "meta") -> nn.Module:
    """The configured ranker (`model.name`), tables on `device` (meta: DistributedModelParallel
    materializes them as shards)."""
    if cfg.name == "dlrm":
        from training.models.dlrm import DLRMRanker

        return DLRMRanker(spec, cfg, device=device)
    if cfg.name == "hstu":
        from training.models.hstu import HSTURanker

        return HSTURanker(spec, cfg, device=device)
    raise ValueError(f"model.name={cfg.name!r}: choose from {list(MODELS)}")
