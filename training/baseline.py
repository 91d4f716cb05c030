"""The linear baseline beside a run (`train.baseline=true`): logistic regression on the same features,
split, epochs and early stopping, and the run's margin over it.

A model with a wide part (`model.wide=true`) also *starts* from the baseline (`train.start_from_baseline`):
the baseline trains first, its weights become the wide part's, and the deep part's output layer starts at
zero, so the model's first state scores exactly as the baseline does. With early stopping that state is
judged like an epoch, so the checkpoint export takes is never worse on validation than the baseline: the
deep part is kept only where it helps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adsfm.contract.config import AdsfmConfig, Arch, ModelConfig, ParallelConfig, as_config, to_plain, typed
from adsfm.contract.features import FeatureSpec
from adsfm.parallel.shard import load_full_state
from adsfm.training.checkpoint import load_into_unsharded
from adsfm.training.models import build_model
from adsfm.training.models.pooled import table_dim
from adsfm.training.models.wide import WIDE_COLS, Wide

if TYPE_CHECKING:
    from adsfm.training.job import TrainResult


def starts_from_baseline(cfg: AdsfmConfig) -> bool:
    """Whether this run trains the baseline first and starts its wide part from it."""
    return bool(cfg.train.baseline and cfg.train.start_from_baseline and cfg.model.wide
                and cfg.model.arch in (Arch.dlrm, Arch.dcnv2))


def baseline_config(cfg: AdsfmConfig, run_dir: Path) -> AdsfmConfig:
    """The same job as logistic regression: features, split, epochs and early stopping unchanged; one
    layout that any model allows (data parallel has nothing to split in a linear model's dense side)."""
    base = as_config(to_plain(cfg))
    base.model = typed(ModelConfig, {"arch": "logreg"})
    if cfg.parallel.tp > 1 or cfg.parallel.sparse_group:
        base.parallel = typed(ParallelConfig, {"name": "single", "num_workers": 1})
    base.train.baseline = False
    base.run_dir = str(run_dir / "baseline")
    base.experiment_name = f"{cfg.experiment_name}-baseline"
    return base


def train_baseline(cfg: AdsfmConfig, run_dir: Path) -> TrainResult:
    from adsfm.training.job import run_training

    print("[adsfm] train.baseline: logistic regression on the same features and split"
          + (", first: the model starts from it" if starts_from_baseline(cfg) else ""), flush=True)
    return run_training(baseline_config(cfg, run_dir))


def compare(cfg: AdsfmConfig, holdout: dict[str, float], base: TrainResult) -> dict[str, Any]:
    """This run's holdout margin over the baseline's (printed, and logged by the job)."""
    out: dict[str, Any] = {
        "baseline_holdout_auc": base.holdout["auc"],
        "baseline_holdout_logloss": base.holdout["logloss"],
        "holdout_auc_vs_baseline": holdout["auc"] - base.holdout["auc"],
        "holdout_logloss_vs_baseline": holdout["logloss"] - base.holdout["logloss"],
        "baseline_run_id": base.run_id,
    }
    d = out["holdout_auc_vs_baseline"]
    verdict = ("earns its place" if d > 0 else "is the baseline: the deep part never helped on validation" if d == 0
               else "does NOT beat the linear baseline")
    print(f"[adsfm] {cfg.model.arch} holdout AUC {holdout['auc']:.4f} vs logistic regression {base.holdout['auc']:.4f} "
          f"({d:+.4f}): the model {verdict}", flush=True)
    return out


@torch.no_grad()
def start_from_baseline(model: nn.Module, spec: FeatureSpec, cfg: ModelConfig, checkpoint: Path) -> None:
    """Set a (possibly sharded) wide-and-deep model to the baseline's function: each table's last WIDE_COLS
    columns and the dense weights from the baseline's checkpoint, the deep part's output layer (every task's
    head) zero. Its other weights keep their initial values; each rank writes the slices it holds."""
    base = build_model(spec, typed(ModelConfig, {"arch": "logreg"}), device="cpu")
    load_into_unsharded(base, checkpoint)
    dim = table_dim(cfg)
    parts = {k: v for k, v in base.state_dict().items()}
    at: dict[str, tuple[int, ...]] = {k: (0, dim - WIDE_COLS) for k in parts if k.startswith("sparse.")}
    plain = build_model(spec, cfg, device="meta")
    deep = getattr(plain.dense, "deep", None)
    if deep is None:
        raise ValueError(f"model.arch={cfg.arch} with model.wide={cfg.wide}: no deep part to start beside the baseline")
    last = [n for n, m in deep.named_modules() if isinstance(m, nn.Linear)][-1]
    for p in ("weight", "bias"):
        shape = getattr(deep.get_submodule(last), p).shape
        parts[f"dense.deep.{last}.{p}"] = torch.zeros(shape)
    load_full_state(model, parts, at=at)
    for m in model.modules():
        if isinstance(m, Wide):
            m.frozen_ids = True
