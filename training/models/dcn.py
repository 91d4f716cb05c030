"""DCN-v2's dense side (Wang et al. 2021), stacked, from TorchRec's blocks as its DLRM_DCN uses them: the
bottom MLP's output and the pooled embeddings, concatenated, go through low-rank cross layers, then the
top MLP → logit."""

from __future__ import annotations

from torchrec.models.dlrm import DenseArch, InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet

from adsfm.contract.config import ModelConfig
from adsfm.training.models.dlrm import InteractionDense, check_mlps, heads


class DCNv2Dense(InteractionDense):
    def __init__(self, num_dense: int, num_sparse: int, cfg: ModelConfig, tasks: int = 1) -> None:
        super().__init__()
        check_mlps(cfg)
        self.tasks = tasks
        if cfg.cross_layers < 1 or cfg.cross_rank < 1:
            raise ValueError(f"model.cross_layers({cfg.cross_layers}) and model.cross_rank({cfg.cross_rank}) must be >= 1")
        self.num_dense = num_dense
        width = (num_sparse + 1) * cfg.embedding_dim
        self.dense_arch = DenseArch(max(num_dense, 1), list(cfg.dense_arch))
        self.inter_arch = InteractionDCNArch(num_sparse, LowRankCrossNet(width, cfg.cross_layers, cfg.cross_rank))
        self.over_arch = OverArch(width, heads(cfg, tasks))
