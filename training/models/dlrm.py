"""DLRM's dense side (Naumov et al. 2019) from TorchRec's building blocks: bottom MLP on the dense values,
pairwise dot interaction with the pooled embeddings, top MLP → logit (the tables: `pooled.py`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch

from adsfm.contract.config import ModelConfig
from adsfm.parallel.dense_plan import DensePlan


class InteractionDense(nn.Module):
    """Bottom MLP on the dense inputs, an interaction of its output with the pooled embeddings, top MLP →
    logit: the shape DLRM and DCN-v2 share; each sets `dense_arch`, `inter_arch` and `over_arch`."""

    num_dense: int
    tasks: int = 1
    """Logits per row: one per task (the top MLP's last layer has this many outputs)."""
    dense_arch: nn.Module
    inter_arch: nn.Module
    over_arch: nn.Module

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.num_dense == 0:  # a constant bottom input, so the interaction keeps its shape
            dense = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        x = self.dense_arch(dense)
        y = self.inter_arch(dense_features=x, sparse_features=embeddings)
        logits: torch.Tensor = self.over_arch(y)
        return logits.squeeze(-1) if self.tasks == 1 else logits

    def parallel_plan(self, tp: int) -> DensePlan:
        units = [n for n in ("dense_arch", "inter_arch", "over_arch") if any(True for _ in getattr(self, n).parameters())]
        return over_arch_plan(self.over_arch, tp, fsdp_units=units)


class DLRMDense(InteractionDense):
    """Bottom MLP on dense features, pairwise dot interaction with the pooled embeddings, top MLP → logit."""

    def __init__(self, num_dense: int, num_sparse: int, cfg: ModelConfig, tasks: int = 1) -> None:
        """`num_dense`: the width of the dense input (dense features and their missing indicators); `tasks`:
        logits per row."""
        super().__init__()
        check_mlps(cfg)
        self.num_dense, self.tasks = num_dense, tasks
        self.dense_arch = DenseArch(max(num_dense, 1), list(cfg.dense_arch))
        self.inter_arch = InteractionArch(num_sparse_features=num_sparse)
        over_in = cfg.embedding_dim + num_sparse * (num_sparse + 1) // 2
        self.over_arch = OverArch(over_in, heads(cfg, tasks))


def check_mlps(cfg: ModelConfig) -> None:
    """The bottom MLP ends at the embedding width (the interaction joins them); the top MLP at one logit."""
    if cfg.dense_arch[-1] != cfg.embedding_dim:
        raise ValueError(
            f"model.dense_arch[-1]({cfg.dense_arch[-1]}) != model.embedding_dim({cfg.embedding_dim}): "
            f"the {cfg.arch} interaction needs them equal"
        )
    if cfg.over_arch[-1] != 1:
        raise ValueError(f"model.over_arch[-1]={cfg.over_arch[-1]}: the last layer must be 1 (one logit per task)")


def heads(cfg: ModelConfig, tasks: int) -> list[int]:
    """The top MLP's sizes with one output per task: the hidden layers are shared, the last Linear is the
    tasks' heads (a shared-bottom multi-task model)."""
    return [*cfg.over_arch[:-1], tasks]


def over_arch_plan(over_arch: nn.Module, tp: int, fsdp_units: list[str]) -> DensePlan:
    """Tensor parallel: the top MLP's first Linear column-wise and its second row-wise, so the hidden
    activation stays split and one all-reduce joins the output. FSDP: `fsdp_units`, then the dense root."""
    linears = [n for n, m in over_arch.named_modules() if isinstance(m, nn.Linear)]
    widths = [m.out_features for m in over_arch.modules() if isinstance(m, nn.Linear)]
    if tp > 1 and (len(linears) < 3 or widths[0] % tp):
        raise ValueError(
            f"parallel.tp({tp}) splits model.over_arch[0]({widths[0] if widths else None}) across ranks: it needs "
            f"at least two hidden layers before the logit and over_arch[0] % tp == 0 (got {widths})"
        )
    tensor_parallel = {f"over_arch.{linears[0]}": ColwiseParallel(), f"over_arch.{linears[1]}": RowwiseParallel()} if tp > 1 else {}
    return DensePlan(tensor_parallel=tensor_parallel, fsdp_units=fsdp_units)
