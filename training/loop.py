"""Train and eval steps shared by the Ray worker, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch

from adsfm.parallel.mesh import data_coords
from adsfm.training.data import FeatureSet
from adsfm.training.metrics import task_metrics


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, task_weights: torch.Tensor | None = None) -> float:
    """One step; returns this rank's mean loss on its slice of the global batch. With several tasks (labels
    [B, T]) the loss is the `task_weights`-weighted sum of the tasks' mean log losses."""
    loss = loss_of(model(batch.dense_features, batch.sparse_features), batch.labels, task_weights)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def loss_of(logits: torch.Tensor, labels: torch.Tensor, task_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: mean log loss, or with several tasks (logits [B, T]) the `task_weights`-weighted
    sum of the tasks' mean log losses."""
    if logits.dim() == 2:
        per_task = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
        return per_task.sum() if task_weights is None else (per_task * task_weights).sum()
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


class LossMeter:
    """Per-step losses of the global batch, all-reduced in one collective per `flush` rather than one per
    step: logging needs them every log_every steps, and the training step itself needs no extra collective."""

    def __init__(self) -> None:
        self.pending: list[float] = []

    def add(self, local_loss: float) -> None:
        self.pending.append(local_loss)

    def flush(self) -> list[float]:
        """The global-batch mean loss of every step added since the last flush, in order."""
        out, self.pending = self.pending, []
        if not out or not dist.is_initialized() or dist.get_world_size() == 1:
            return out
        t = torch.tensor(out, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / dist.get_world_size()).tolist()


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank (one tiny all_reduce): lets ranks with unequal streams stop at
    the same step, since a rank that leaves a collective early hangs the others."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def predict(model: nn.Module, fs: FeatureSet, idx: np.ndarray, batch_size: int) -> torch.Tensor:
    """Probabilities for rows `idx` ([n], or [n, T] for T tasks), computed across all ranks and gathered on
    every rank.

    Sharded lookups are collectives, so every rank must run the same number of equally sized batches:
    the rows are padded to a multiple of dp * batch_size and the padding is dropped after the gather.
    """
    c = data_coords()  # ranks of one tensor-parallel group take the same rows
    n = len(idx)
    per_step = c.dp * batch_size
    steps = max(1, -(-n // per_step))
    padded = np.resize(idx, steps * per_step)  # repeats rows to fill the last step
    was_training = model.training
    model.eval()
    local = []
    for s in range(steps):
        rows = padded[s * per_step + c.dp_rank * batch_size : s * per_step + (c.dp_rank + 1) * batch_size]
        b = fs.take(rows)
        local.append(torch.sigmoid(model(b.dense_features, b.sparse_features)))
    model.train(was_training)
    mine = torch.stack(local)  # [steps, batch(, tasks)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        # step s of data rank d covers padded[s*per_step + d*bs : ...]: interleave back into row order,
        # taking one rank (tp coordinate 0) of each tensor-parallel group.
        mine = torch.stack(parts[:: c.tp], dim=1)
    return mine.reshape(-1, *local[0].shape[1:])[:n]  # [n] or [n, tasks]


def evaluate(model: nn.Module, fs: FeatureSet, idx: np.ndarray, batch_size: int,
             task_weights: list[float] | None = None) -> dict[str, float]:
    """Holdout metrics. Several tasks: each task's as `<task>_auc`, ...; the plain keys are the first
    task's, and `loss` is the weighted sum of the tasks' log losses (what training minimises)."""
    return task_metrics(predict(model, fs, idx, batch_size), fs.labels[idx], fs.spec.tasks, task_weights)
