"""`train.pipeline=sparse_dist`: TorchRec's TrainPipelineSparseDist drives the steps. While batch i's
dense forward and backward run, batch i+1's ids are already on their way to the ranks that hold their
tables (the input distribution's all-to-all), so communication hides behind compute.

The pipeline rewrites the sharded tables' forwards to take their inputs from its own queue, found by
tracing the model called with a whole batch; `StepBatch` tells that trace the model's second argument
is absent (the model then reads `batch.sparse_features` itself). Evaluation needs the model's own
forwards back, so each epoch's pipeline is detached at its end.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from adsfm.training.loop import loss_of


@dataclass
class StepBatch(Batch):
    """A Batch whose model call is `model(batch)`: `to_proxy_tuple` gives TorchRec's tracer the concrete
    arguments of that call (the KJT argument absent), so it finds `batch.sparse_features` as the tables'
    input."""

    def to_proxy_tuple(self, model: nn.Module) -> dict[str, Any]:
        return {"kjt": None}

    def to(self, device: torch.device, non_blocking: bool = False) -> StepBatch:
        b = super().to(device, non_blocking)  # a plain Batch: the pipeline moves every batch, and must keep the type
        return StepBatch(b.dense_features, b.sparse_features, b.labels)


def sparse_dist_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
                      task_weights: torch.Tensor | None = None) -> Generator[float, None, None]:
    """Train on `batches` through TrainPipelineSparseDist; yields each step's loss (this rank's slice)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    def forward(batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_of(model(batch), batch.labels, task_weights)
        return loss, loss.detach()

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    pipe = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True, custom_model_fwd=forward)
    steps = (StepBatch(b.dense_features, b.sparse_features, b.labels) for b in batches)
    try:
        while True:
            try:
                loss = pipe.progress(steps)
            except StopIteration:
                return
            if not pipe._pipelined_modules:  # TorchRec fell back to plain steps: the switch would say what is not so
                raise RuntimeError("train.pipeline=sparse_dist: TorchRec pipelined none of the model's tables")
            yield float(loss)
    finally:
        pipe.detach()  # the model's own forwards back, for evaluation and checkpoints
