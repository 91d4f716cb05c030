"""Ranking models: a sparse arch built on the meta device + a dense arch, each declaring how its dense side
splits under tensor parallelism and FSDP (`parallel_plan`), which adsfm.parallel.shard applies."""

from __future__ import annotations

import torch
from torch import nn

from adsfm.contract.config import Arch, ModelConfig
from adsfm.contract.features import FeatureSpec

POOLED_ARCHS = (Arch.dlrm, Arch.dcnv2, Arch.logreg)
"""The architectures that score pooled embeddings (training/models/pooled.py), one bundle format for all."""


def features_by_table(spec: FeatureSpec) -> dict[str, list[str]]:
    """Each embedding table of the data spec with the features that look it up, in spec order (raw
    features have no table)."""
    tables: dict[str, list[str]] = {}
    for f in spec.sparse:
        if not f.raw:
            tables.setdefault(f.table_name, []).append(f.name)
    return tables


def build_model(spec: FeatureSpec, cfg: ModelConfig, device: torch.device | str = "meta") -> nn.Module:
    """The configured model (`model.arch`), tables on `device` (meta: DistributedModelParallel
    materializes them as shards)."""
    if cfg.arch in POOLED_ARCHS:
        from adsfm.training.models.pooled import PooledRanker

        return PooledRanker(spec, cfg, device=device)
    if cfg.arch == Arch.hstu:
        from adsfm.training.models.hstu import HSTU

        if spec.tasks:
            raise ValueError(f"data.labels: model=hstu scores one task; multi-task heads are for {[str(a) for a in POOLED_ARCHS]}")
        return HSTU(spec, cfg, device=device)
    raise ValueError(f"model.arch={cfg.arch}: choose from {[str(a) for a in Arch]}")
