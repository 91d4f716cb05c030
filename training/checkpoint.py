"""Distributed checkpoints (torch.distributed.checkpoint) that are visible only once complete.

Every rank writes its shards into `<dir>.partial`; rank 0 adds `state.json` (step, data position, loss
history, RNG seed) and, after a barrier, renames the directory to `<dir>`. A crash mid-save leaves only a
`.partial` directory, which `latest_checkpoint` never returns. Loading does not need the world that wrote
it: DCP reshards on load, into another number of ranks or into a plain single-process model.
"""

from __future__ import annotations

import json
import shutil
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
    partial = directory.with_name(directory.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optim"] = optimizer.state_dict()
    dcp.save(payload, checkpoint_id=str(partial))
    if _rank() == 0:
        (partial / STATE_FILE).write_text(json.dumps(state or {}))
    _barrier()
    if _rank() == 0:
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
        if keep > 0:
            for old in complete_checkpoints(directory.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return directory


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
