"""Distributed checkpoints (torch.distributed.checkpoint) that are visible only once complete.

Every rank writes its shards into `<dir>.partial` and fsyncs them; rank 0 adds
`state.json` (step, data position, loss history, RNG seed), fsyncs every file and directory of the tree
and, after a barrier, renames the directory to `<dir>` and fsyncs the parent: on a crash, at any point,
the published name holds a complete checkpoint. A crash mid-save leaves only a `.partial` directory, which
`latest_checkpoint` never returns. Older checkpoints are removed only after the new one is published (a
checkpoint of the same step is first moved aside to `<dir>.old`, which `latest_checkpoint` returns if a
crash came before the new one took its name). Loading does not need the world that wrote it: DCP reshards
on load, into another number of ranks or into a plain single-process model.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from adsfm.contract.delta import fsync_path

STATE_FILE = "state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None, keep: int = 0, managed: nn.Module | None = None,
) -> Path:
    """Save model (and optimizer, and the managed tables' remap) shards from every rank; publish
    atomically; keep the newest `keep`."""
    partial, payload = _begin(model, directory, optimizer, managed)
    dcp.save(payload, checkpoint_id=str(partial))
    _fsync_own(partial)
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
    interleave with training's, and publishes it -- `state.json` added, `.partial` renamed -- as soon as
    every rank's writes are done, not at the next save: a crash after that resumes from it. The same
    guarantee as `save_checkpoint`, that only complete checkpoints are visible. `wait` blocks until the
    checkpoint in flight is published. (DCP's own async_save cannot stage TorchRec's ShardedTensors.)
    """

    def __init__(self) -> None:
        self.pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adsfm-ckpt")
        self.pending: Future[Path] | None = None

    def save(self, model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None,
             state: dict[str, Any] | None = None, keep: int = 0, managed: nn.Module | None = None) -> None:
        self.wait()
        partial, payload = _begin(model, directory, optimizer, managed)
        self.pending = self.pool.submit(self._write, _stage(payload), partial, directory, json.dumps(state or {}), keep)

    def _write(self, staged: dict[str, Any], partial: Path, directory: Path, state: str, keep: int) -> Path:
        """In the writer thread: every rank's shards, then (rank 0, once all have written) the publishing."""
        dcp.save(staged, checkpoint_id=str(partial), process_group=self.pg, no_dist=self.pg is None)
        _fsync_own(partial)
        if self.pg is not None:
            dist.barrier(group=self.pg)
        if _rank() == 0:
            (partial / STATE_FILE).write_text(state)
            _publish(partial, directory, keep)
        if self.pg is not None:  # no rank's wait() returns before the checkpoint is published
            dist.barrier(group=self.pg)
        return directory

    def wait(self) -> Path | None:
        """Block until the checkpoint in flight is published (re-raising its error); returns its directory."""
        if self.pending is None:
            return None
        future, self.pending = self.pending, None
        return future.result()


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


def _begin(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None, managed: nn.Module | None = None
           ) -> tuple[Path, dict[str, Any]]:
    """A clean `<dir>.partial` on every rank, and the state to write into it."""
    partial = directory.with_name(directory.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optim"] = optimizer.state_dict()
    if managed:
        payload["managed"] = managed.state_dict()
    return partial, payload


def _fsync_own(partial: Path) -> None:
    """This rank's shard files (DCP names them __<rank>_<n>.distcp), before the barrier that lets rank 0
    publish: on a file system shared between nodes, rank 0's fsync does not cover another node's writes."""
    for f in partial.glob(f"__{_rank()}_*.distcp"):
        fsync_path(f)


def _fsync_tree(root: Path) -> None:
    """Every file under root, then every directory bottom-up (their entries), on disk."""
    for parent, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(parent) / name)
        fsync_path(Path(parent))


def _publish(partial: Path, directory: Path, keep: int) -> None:
    """Rename a complete `.partial` to its name, durably; only then remove what it replaces or outlives."""
    _fsync_tree(partial)
    aside = directory.with_name(directory.name + ".old")
    if directory.exists():  # the same step again (a resumed run): moved aside, not deleted, until replaced
        if aside.exists():
            shutil.rmtree(aside)
        directory.rename(aside)
    partial.rename(directory)
    fsync_path(directory.parent)
    _cleanup(directory, keep)


def _cleanup(directory: Path, keep: int) -> None:
    aside = directory.with_name(directory.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    if keep > 0:
        for old in complete_checkpoints(directory.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _step(p: Path) -> int | None:
    digits = p.name.removeprefix("step_").removesuffix(".old")
    return int(digits) if p.name.startswith("step_") and digits.isdigit() and p.is_dir() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under root, oldest first: `step_N`, or `step_N.old` where a crash came between
    moving it aside and publishing its replacement."""
    done: dict[int, Path] = {}
    for p in root.glob("step_*"):
        step = _step(p)
        if step is not None and (step not in done or not p.name.endswith(".old")):
            done[step] = p
    return [done[k] for k in sorted(done)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load_checkpoint(model: nn.Module, directory: Path, optimizer: torch.optim.Optimizer | None = None,
                    managed: nn.Module | None = None) -> dict[str, Any]:
    """Load into a (possibly sharded, possibly differently laid out) model and optimizer, and the managed
    tables' remap; returns state.json."""
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optim"] = optimizer.state_dict()
    if managed:
        payload["managed"] = managed.state_dict()
    dcp.load(payload, checkpoint_id=str(directory))
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optim"])
    if managed:
        managed.load_state_dict(payload["managed"])
    path = directory / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def has_optimizer_state(directory: Path) -> bool:
    """Whether the checkpoint holds optimizer state (a model saved alone does not)."""
    return checkpoint_holds(directory, "optim")


def checkpoint_holds(directory: Path, part: str) -> bool:
    """Whether the checkpoint holds `part` ("optim", "managed"): a model may be saved without them."""
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    return any(k.split(".", 1)[0] == part for k in meta.state_dict_metadata)


def load_managed(managed: nn.Module, directory: Path) -> None:
    """The managed tables' remap of a checkpoint (export's: no process group needed)."""
    state = {"managed": managed.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    managed.load_state_dict(state["managed"])


def load_into_unsharded(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint written by any number of ranks into a plain (unsharded, CPU) model, in place."""
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} does not exist (a '.partial' one was never completed)")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])
