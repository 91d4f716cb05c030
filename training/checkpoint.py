"""Distributed checkpoints (torch.distributed.checkpoint) that are visible only once complete.

Every rank writes its shards into `<dir>.partial`; after a barrier rank 0 renames it to `<dir>`. A crash
mid-save leaves only a `.partial` directory, which `latest_checkpoint` ignores. Loading does not need
the world that wrote it: DCP reshards on load, also into a plain single-process model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn


def save_checkpoint(model: nn.Module, directory: Path) -> Path:
    partial = directory.with_name(directory.name + ".partial")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(partial))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
    if dist.is_initialized():
        dist.barrier()
    return directory


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def load_into_unsharded(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint written by any number of ranks into a plain (unsharded, CPU) model, in place."""
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} does not exist (a '.partial' one was never completed)")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])
