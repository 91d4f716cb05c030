"""Models that score pooled embeddings: the tables (an EmbeddingBagCollection, meant for the meta device)
pool each feature's ids into one vector, and a dense module turns [dense values, pooled embeddings
[B, F, D]] into a logit. Only the dense module is exported to ONNX; the tables become plain arrays that
serving looks up and pools itself, so every architecture here is served by the same engine.

The dense modules: DLRM (`dlrm.py`), DCN-v2 (`dcn.py`), and the wide part (`wide.py`), which is also the
whole of logistic regression. A wide part's weight per id lives in WIDE_COLS more columns of each table,
so it costs no second lookup and no change to the bundle.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsfm.contract.config import Arch, ModelConfig
from adsfm.contract.features import FeatureSpec
from adsfm.parallel.dense_plan import DensePlan
from adsfm.training.models import POOLED_ARCHS, features_by_table
from adsfm.training.models.wide import WIDE_COLS, Wide

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_dim(cfg: ModelConfig) -> int:
    """Columns of every table: the deep embedding, plus the wide weight's; logreg has only the latter."""
    if cfg.arch == Arch.logreg:
        return WIDE_COLS
    return cfg.embedding_dim + (WIDE_COLS if cfg.wide else 0)


def table_configs(spec: FeatureSpec, dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig of `dim` columns per table of the data spec, in the spec's feature order."""
    configs = []
    for table, feats in features_by_table(spec).items():
        t = spec.tables[table]
        configs.append(
            EmbeddingBagConfig(
                name=table,
                embedding_dim=dim,
                num_embeddings=t.rows,
                feature_names=feats,
                pooling=_POOLING[t.pooling],
            )
        )
    return configs


def dense_module(num_dense: int, num_sparse: int, cfg: ModelConfig, tasks: int = 1) -> nn.Module:
    """The configured dense module: (dense [B, num_dense], embeddings [B, num_sparse, table_dim]) → logit [B],
    or [B, tasks] with several tasks. `num_dense` is the width of the dense input (dense features and their
    missing indicators)."""
    if cfg.arch == Arch.logreg:
        return Wide(num_dense, None, tasks)
    if cfg.arch == Arch.dlrm:
        from adsfm.training.models.dlrm import DLRMDense

        deep: nn.Module = DLRMDense(num_dense, num_sparse, cfg, tasks)
    elif cfg.arch == Arch.dcnv2:
        from adsfm.training.models.dcn import DCNv2Dense

        deep = DCNv2Dense(num_dense, num_sparse, cfg, tasks)
    else:
        raise ValueError(f"model.arch={cfg.arch} does not score pooled embeddings; those that do: {[str(a) for a in POOLED_ARCHS]}")
    return Wide(num_dense, deep, tasks) if cfg.wide else deep


class PooledRanker(nn.Module):
    """Embedding tables + the configured dense module (`model.arch` dlrm, dcnv2 or logreg); one logit per
    row, or one per task of `spec.tasks`."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | str = "meta") -> None:
        super().__init__()
        raw = [f.name for f in spec.sparse if f.raw]
        if raw:
            raise ValueError(f"model.arch={cfg.arch} has no use for raw features {raw}: drop them from data.sparse or use model=hstu")
        self.feature_names = [f.name for f in spec.sparse]
        self.sparse = EmbeddingBagCollection(tables=table_configs(spec, table_dim(cfg)), device=torch.device(device))
        self.dense = dense_module(len(spec.dense_inputs()), len(self.feature_names), cfg, spec.outputs)

    def parallel_plan(self, tp: int) -> DensePlan:
        plan: DensePlan = self.dense.parallel_plan(tp)  # type: ignore[operator]
        return plan

    def forward(self, dense: torch.Tensor | Batch, kjt: KeyedJaggedTensor | None = None) -> torch.Tensor:
        if kjt is None:  # called with a whole Batch: how TorchRec's TrainPipelineSparseDist calls (and traces) it
            batch = cast(Batch, dense)  # under TorchRec's tracer, a proxy of one
            dense, kjt = batch.dense_features, batch.sparse_features
        pooled = self.sparse(kjt).to_dict()
        embeddings = torch.stack([pooled[f] for f in self.feature_names], dim=1)
        return self.dense(dense, embeddings)
