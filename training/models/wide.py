"""The wide (linear) part: a weight per id, pooled like the embeddings, plus a weight per dense value and a
bias. On its own (`deep` None) it is logistic regression, `model.arch=logreg`; beside a deep module
(`model.wide=true`) its logit is added to the deep one, which sees only the first columns of each table.

The weight per id is the mean of the last WIDE_COLS columns of the tables: one lookup serves both parts,
and a bundle of a wide model is an ordinary pooled bundle with wider rows. Four columns, not one, because
FBGEMM's embedding kernels take only widths that are multiples of 4. With several tasks (up to four) the
columns are split between them, each task's weight the mean of its share.
"""

from __future__ import annotations

import torch
from torch import nn

from adsfm.parallel.dense_plan import DensePlan

WIDE_COLS = 4
"""Columns of each table that hold the wide part's weight per id (their mean)."""


class Wide(nn.Module):
    def __init__(self, num_dense: int, deep: nn.Module | None, tasks: int = 1) -> None:
        super().__init__()
        if tasks > WIDE_COLS:
            raise ValueError(f"data.labels: {tasks} tasks; a wide part (model.wide, model=logreg) has weight columns for "
                             f"{WIDE_COLS} at most")
        self.linear = nn.Linear(max(num_dense, 1), tasks)
        self.num_dense, self.tasks = num_dense, tasks
        self.deep = deep
        self.bounds = [WIDE_COLS * t // tasks for t in range(tasks + 1)]  # each task's share of the columns
        self.frozen_ids = False
        """Training only: the weights per id take no gradient (the deep part fits what a started-from
        baseline leaves; training/baseline.py). Scores are the same either way."""

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        cols = embeddings[:, :, -WIDE_COLS:]
        if self.frozen_ids:
            cols = cols.detach()
        ids = torch.stack([cols[:, :, a:b].mean(dim=2).sum(dim=1) for a, b in zip(self.bounds, self.bounds[1:], strict=False)], dim=1)
        values = dense if self.num_dense else torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        logit = self.linear(values) + ids
        if self.tasks == 1:
            logit = logit.squeeze(-1)
        if self.deep is not None:
            logit = logit + self.deep(dense, embeddings[:, :, :-WIDE_COLS])
        return logit

    def parallel_plan(self, tp: int) -> DensePlan:
        if self.deep is None:
            if tp > 1:
                raise ValueError(f"parallel.tp({tp}): model.arch=logreg has no hidden layer to split; use a dp-only layout")
            return DensePlan()
        plan: DensePlan = self.deep.parallel_plan(tp)  # type: ignore[operator]
        return DensePlan(
            tensor_parallel={f"deep.{k}": v for k, v in plan.tensor_parallel.items()},
            fsdp_units=[f"deep.{u}" for u in plan.fsdp_units],
            head_shared=[f"deep.{h}" for h in plan.head_shared],
        )
