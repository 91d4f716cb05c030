"""DLRM (Naumov et al. 2019) from TorchRec's building blocks, split so the dense half exports on its own.

`DLRMDense` takes already pooled embeddings [B, F, D]; it is the graph exported to ONNX, while the tables
become plain arrays that serving looks up itself. `DLRMRanker` joins them for training.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from training.config import ModelConfig
from training.models import features_by_table

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(spec: dict, embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table of the data spec, in the spec's feature order."""
    configs = []
    for table, feats in features_by_table(spec).items():
        t = spec["tables"][table]
        if t["pooling"] not in _POOLING:
            raise ValueError(f"table {table!r}: pooling={t['pooling']!r}, use 'sum' or 'mean'")
        configs.append(
            EmbeddingBagConfig(
                name=table,
                embedding_dim=embedding_dim,
                num_embeddings=t["rows"],
                feature_names=feats,
                pooling=_POOLING[t["pooling"]],
            )
        )
    return configs


class DLRMDense(nn.Module):
    """Bottom MLP on dense features, pairwise dot interaction with the pooled embeddings, top MLP → logit."""

    def __init__(self, num_dense: int, num_sparse: int, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.dense_arch[-1] != cfg.embedding_dim:
            raise ValueError(
                f"model.dense_arch[-1]({cfg.dense_arch[-1]}) != model.embedding_dim({cfg.embedding_dim}): "
                "the dot interaction needs them equal"
            )
        if cfg.over_arch[-1] != 1:
            raise ValueError(f"model.over_arch[-1]={cfg.over_arch[-1]}: the last layer must be 1 (one logit)")
        self.num_dense = num_dense
        d = cfg.embedding_dim
        # A model with no dense columns still gets a (constant) bottom input so the interaction is unchanged.
        self.dense_arch = DenseArch(max(num_dense, 1), list(cfg.dense_arch))
        self.inter_arch = InteractionArch(num_sparse_features=num_sparse)
        over_in = d + num_sparse * (num_sparse + 1) // 2
        self.over_arch = OverArch(over_in, list(cfg.over_arch))

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.num_dense == 0:
            dense = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        x = self.dense_arch(dense)
        y = self.inter_arch(dense_features=x, sparse_features=embeddings)
        return self.over_arch(y).squeeze(-1)


class DLRMRanker(nn.Module):
    """Embedding tables (EmbeddingBagCollection, meant for the meta device) + DLRMDense."""

    kind = "dlrm"

    def __init__(self, spec: dict, cfg: ModelConfig, device: torch.device | str = "meta") -> None:
        super().__init__()
        raw = [f["name"] for f in spec["sparse"] if f.get("raw")]
        if raw:
            raise ValueError(f"model.name=dlrm has no use for raw features {raw}: drop them from data.sparse or use model=hstu")
        self.feature_names = [f["name"] for f in spec["sparse"]]
        self.sparse = EmbeddingBagCollection(tables=table_configs(spec, cfg.embedding_dim), device=torch.device(device))
        self.dense = DLRMDense(len(spec["dense"]), len(self.feature_names), cfg)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse(kjt).to_dict()
        embeddings = torch.stack([pooled[f] for f in self.feature_names], dim=1)
        return self.dense(dense, embeddings)
