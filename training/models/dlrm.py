"""DLRM (Naumov et al. 2019) from TorchRec's building blocks, split so the dense half exports on its own.

`DLRMDense` takes already pooled embeddings [B, F, D]; it is the graph exported to ONNX, while the tables
become plain arrays that serving looks up itself. `DLRM` joins them for training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsfm.contract.config import ModelConfig
from adsfm.contract.features import FeatureSpec
from adsfm.parallel.dense_plan import DensePlan
from adsfm.training.models import features_by_table

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(spec: FeatureSpec, embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table of the data spec, in the spec's feature order."""
    configs = []
    for table, feats in features_by_table(spec).items():
        t = spec.tables[table]
        configs.append(
            EmbeddingBagConfig(
                name=table,
                embedding_dim=embedding_dim,
                num_embeddings=t.rows,
                feature_names=feats,
                pooling=_POOLING[t.pooling],
            )
        )
    return configs


class DLRMDense(nn.Module):
    """Bottom MLP on dense features, pairwise dot interaction with the pooled embeddings, top MLP → logit."""

    def __init__(self, num_dense: int, num_sparse: int, cfg: ModelConfig) -> None:
        """`num_dense`: the width of the dense input (dense features and their missing indicators)."""
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


class DLRM(nn.Module):
    """Embedding tables (EmbeddingBagCollection, meant for the meta device) + DLRMDense."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | str = "meta") -> None:
        super().__init__()
        raw = [f.name for f in spec.sparse if f.raw]
        if raw:
            raise ValueError(f"model.arch=dlrm has no use for raw features {raw}: drop them from data.sparse or use model=hstu")
        self.feature_names = [f.name for f in spec.sparse]
        self.over_arch_sizes = list(cfg.over_arch)
        self.sparse = EmbeddingBagCollection(tables=table_configs(spec, cfg.embedding_dim), device=torch.device(device))
        self.dense = DLRMDense(len(spec.dense_inputs()), len(self.feature_names), cfg)

    def parallel_plan(self, tp: int) -> DensePlan:
        """Tensor parallel: the top MLP's first Linear column-wise and its second row-wise, so the hidden
        activation stays split and one all-reduce joins the output. FSDP units: the bottom and top MLPs."""
        sizes = self.over_arch_sizes
        if tp > 1 and (len(sizes) < 3 or sizes[0] % tp):
            raise ValueError(
                f"parallel.tp({tp}) splits model.over_arch[0]({sizes[0] if sizes else None}) across ranks: it needs "
                f"at least two hidden layers before the logit and over_arch[0] % tp == 0 (got {sizes})"
            )
        linears = [n for n, m in self.dense.over_arch.named_modules() if isinstance(m, nn.Linear)]
        tensor_parallel = {f"over_arch.{linears[0]}": ColwiseParallel(), f"over_arch.{linears[1]}": RowwiseParallel()}
        return DensePlan(tensor_parallel=tensor_parallel if tp > 1 else {}, fsdp_units=["dense_arch", "over_arch"])

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse(kjt).to_dict()
        embeddings = torch.stack([pooled[f] for f in self.feature_names], dim=1)
        return self.dense(dense, embeddings)
