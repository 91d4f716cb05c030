"""Single-process training on an unsharded model: the reference every layout must match, and the quick
path that tests and benchmarks use when a Ray job is not what they measure."""

from __future__ import annotations

import torch
from torch import nn

from adsfm.contract.config import AdsfmConfig
from adsfm.parallel.shard import unsharded_optimizer
from adsfm.training.data import FeatureSet
from adsfm.training.loop import train_step
from adsfm.training.managed import fresh_rows
from adsfm.training.models import build_model
from adsfm.training.stream import train_source
from adsfm.training.worker import optim_config


def train_local(cfg: AdsfmConfig, fs: FeatureSet, max_steps: int = 0, seed: int = 0) -> nn.Module:
    """Train for cfg.train.epochs (or `max_steps`) with the configured optimisers, unfused."""
    torch.manual_seed(seed)
    model = build_model(fs.spec, cfg.model, device="cpu")
    opt = unsharded_optimizer(model, optim_config(cfg))  # type: ignore[arg-type]
    source = train_source(cfg.data, fs, cfg.train.batch_size, cfg.train.seed)
    weights = torch.tensor([lt.weight for lt in cfg.data.labels]) if cfg.data.labels else None
    step = 0
    for epoch in range(cfg.train.epochs):
        for batch in fresh_rows(source.epoch(epoch, 0, 1, skip=0), fs.managed, model):
            if max_steps and step >= max_steps:
                return model.eval()
            train_step(model, opt, batch, weights)
            step += 1
    return model.eval()
