"""Distributed checkpoints (torch.distributed.checkpoint) that are visible only once complete.

Every rank writes its shards into `<dir>.partial`; rank 0 adds `state.json` (step, data position, loss
history, RNG seed) and, after a barrier, renames the directory to `<dir>`. A crash mid-save leaves only a
`.partial` directory, which `latest_checkpoint` never returns. Loading does not need the world that wrote
it: DCP reshards on load, into another number of ranks or into a plain single-process model.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

STATE_FILE = "state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None, keep: int = 0,
) -> Path:
    """Save model (and optimizer) shards from every rank; publish atomically; keep the newest `keep`."""
    partial, payload = _begin(model, directory, optimizer)
    dcp.save(payload, checkpoint_id=str(partial))
    if _rank() == 0:
        (partial / STATE_FILE).write_text(json.dumps(state or {}))
    _barrier()
    if _rank() == 0:
        _publish(partial, directory, keep)
    _barrier()
    return directory


class AsyncCheckpointer:
    """Checkpoints written in the background while training goes on (`train.async_checkpoint`).

    `save` copies the state into fresh CPU tensors (so later steps do not change what is written) and
    returns; a thread writes it with DCP over a process group of its own, so its collectives never
    interleave with training's. A checkpoint is published -- `state.json` added, `.partial` renamed -- by
    the next `save` or by `wait`, once every rank's writes are done: the same guarantee as
    `save_checkpoint`, that only complete checkpoints are visible. (DCP's own async_save cannot stage
    TorchRec's ShardedTensors.)
    """

    def __init__(self) -> None:
        self.pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adsfm-ckpt")
        self.pending: tuple[Future[Any], Path, Path, str, int] | None = None

    def save(self, model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None,
             state: dict[str, Any] | None = None, keep: int = 0) -> None:
        self.wait()
        partial, payload = _begin(model, directory, optimizer)
        staged = _stage(payload)
        future = self.pool.submit(
            dcp.save, staged, checkpoint_id=str(partial), process_group=self.pg, no_dist=not dist.is_initialized()
        )
        self.pending = (future, partial, directory, json.dumps(state or {}), keep)

    def wait(self) -> Path | None:
        """Finish and publish the checkpoint in flight; returns its directory."""
        if self.pending is None:
            return None
        future, partial, directory, state, keep = self.pending
        self.pending = None
        future.result()
        _barrier()
        if _rank() == 0:
            (partial / STATE_FILE).write_text(state)
            _publish(partial, directory, keep)
        _barrier()
        return directory


def _stage(obj: Any) -> Any:
    """A copy of a (sharded) state dict that later in-place updates do not touch."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    if isinstance(obj, ShardedTensor):
        shards = [Shard(tensor=s.tensor.detach().clone(), metadata=s.metadata) for s in obj.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, obj.metadata(), process_group=obj._process_group
        )
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _stage(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_stage(v) for v in obj)
    return obj


def _begin(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None) -> tuple[Path, dict[str, Any]]:
    """A clean `<dir>.partial` on every rank, and the state to write into it."""
    partial = directory.with_name(directory.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optim"] = optimizer.state_dict()
    return partial, payload


def _publish(partial: Path, directory: Path, keep: int) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    if keep > 0:
        for old in complete_checkpoints(directory.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under root, oldest first."""
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial") and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load_checkpoint(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load into a (possibly sharded, possibly differently laid out) model and optimizer; returns state.json."""
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optim"] = optimizer.state_dict()
    dcp.load(payload, checkpoint_id=str(directory))
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optim"])
    path = directory / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_into_unsharded(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint written by any number of ranks into a plain (unsharded, CPU) model, in place."""
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} does not exist (a '.partial' one was never completed)")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])
