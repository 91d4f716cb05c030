"""The one place that applies parallelism to a model, on one mesh, in this order:

1. embedding sharding over all ranks: the TorchRec planner places each table (config-constrained) and
   DistributedModelParallel materializes the meta-device tables as shards, with the sparse optimizer
   fused into the lookup kernel (registered before wrapping, so DMP can fuse it);
2. tensor parallel over the mesh's "tp" dimension (DTensor): the modules the model's declared plan names
   (adsfm.parallel.dense_plan), split as it says;
3. data parallel over "dp": DDP (DMP wraps the dense modules), or FSDP2 `fully_shard` on the plan's units
   and then the dense root.

This module knows no model: a model brings its plan (`parallel_plan`).

With parallel.sparse_group = k, step 1 shards tables within groups of k ranks and replicates them across
the groups (parallel/sparse2d.py), the optimizer syncing the replicas after every step.

Gradient scale: DDP averages dense gradients over ranks, and TorchRec's output dist averages the
gradients of sharded tables the same way, so N ranks train like one process on the global batch with no
correction. tests/distributed/test_equivalence.py checks it for every layout under plain SGD on tables
and dense layers (Adagrad and Adam would not see a constant factor), with a planted x2 that must fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from adsfm.contract.config import ParallelConfig
from adsfm.parallel.dense_plan import SparseDenseModel
from adsfm.parallel.mesh import build_mesh
from adsfm.parallel.plan import make_plan, plan_rows, sharders
from adsfm.parallel.sparse2d import ReplicaSync, SyncedOptimizer, remap_plan, sparse_2d_env

SPARSE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
DENSE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


@dataclass
class OptimConfig:
    sparse: str
    sparse_lr: float
    dense: str
    dense_lr: float
    weight_decay: float = 0.0


def _check_optim(o: OptimConfig) -> None:
    if o.sparse not in SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sparse_optimizer={o.sparse!r}: choose from {list(SPARSE_OPTIMIZERS)}")
    if o.dense not in DENSE_OPTIMIZERS:
        raise ValueError(f"train.dense_optimizer={o.dense!r}: choose from {list(DENSE_OPTIMIZERS)}")


def sparse_optimizer_kwargs(o: OptimConfig) -> dict[str, Any]:
    return {"lr": o.sparse_lr, "eps": 1e-8} if o.sparse != "sgd" else {"lr": o.sparse_lr}


def parallelize_model(
    model: SparseDenseModel,
    cfg: ParallelConfig,
    optim: OptimConfig,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> tuple[DistributedModelParallel, CombinedOptimizer, list[dict[str, object]]]:
    """Shard `model.sparse`, replicate `model.dense`; return the wrapped model, its optimizer and the plan
    (one row per table, see parallel.plan.plan_rows)."""
    _check_optim(optim)
    world_size = dist.get_world_size(pg) if dist.is_initialized() else 1
    mesh = build_mesh(cfg, device.type)
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[optim.sparse], model.sparse.parameters(), sparse_optimizer_kwargs(optim))
    two_d = bool(cfg.sparse_group) and dist.is_initialized()
    # 2D sparse: plan for one group of sparse_group ranks, then move it onto this rank's group.
    plan, est_ms = make_plan(model, cfg, cfg.sparse_group if two_d else world_size, pg if dist.is_initialized() else None)  # type: ignore[arg-type]
    env = None
    if two_d:
        env = sparse_2d_env(world_size, cfg.sparse_group, device.type)
        remap_plan(plan, dist.get_rank(), world_size, cfg.sparse_group, device.type)
    ddp = cfg.data_parallel == "ddp"
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders(), init_data_parallel=ddp, env=env  # type: ignore[arg-type]
    )
    dense = dmp.module.dense
    tp = mesh["tp"].size() if mesh is not None else 1
    declared = model.parallel_plan(tp)
    if tp > 1:
        parallelize_module(dense, mesh["tp"], declared.tensor_parallel)  # type: ignore[index]
    if mesh is not None and not ddp:
        for unit in declared.fsdp_units:
            fully_shard(dense.get_submodule(unit), mesh=mesh["dp"])
        fully_shard(dense, mesh=mesh["dp"])
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    # Data-parallel tables are replicated dense weights (DDP all-reduces their gradients), which TorchRec
    # leaves to the dense optimizer; they get the configured sparse optimizer, unfused, as in one process.
    replicated = {k: v for k, v in unfused.items() if _is_table_weight(k)}
    optimizers: list[Any] = [dmp.fused_optimizer]
    if replicated:
        optimizers.append(KeyedOptimizerWrapper(
            replicated, lambda params: SPARSE_OPTIMIZERS[optim.sparse](params, **sparse_optimizer_kwargs(optim))
        ))
    optimizers.append(KeyedOptimizerWrapper(
        {k: v for k, v in unfused.items() if k not in replicated},
        lambda params: DENSE_OPTIMIZERS[optim.dense](params, lr=optim.dense_lr, weight_decay=optim.weight_decay),
    ))
    if env is not None:
        sync = ReplicaSync(dmp, env)
        sync.broadcast()
        return dmp, SyncedOptimizer(optimizers, sync), plan_rows(plan, est_ms)
    if declared.head_shared and tp > 1:
        shared = [dense.get_parameter(name) for name in declared.head_shared]
        return dmp, HeadSharedGradSum(optimizers, shared, mesh["tp"].get_group()), plan_rows(plan, est_ms)  # type: ignore[index]
    return dmp, CombinedOptimizer(optimizers), plan_rows(plan, est_ms)


class HeadSharedGradSum(CombinedOptimizer):
    """Parameters every head uses (a plan's `head_shared`, e.g. HSTU's relative bias): under tensor
    parallelism each rank's gradient covers only its own heads, so the sum over the tp group, before each
    step, is the whole gradient (as in one process). Done here rather than by a tensor hook because FSDP2
    sets sharded gradients outside autograd."""

    def __init__(self, optimizers: list[Any], shared: list[nn.Parameter], group: dist.ProcessGroup) -> None:
        super().__init__(optimizers)
        self._shared, self._group = shared, group

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for p in self._shared:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(g, group=self._group)
        super().step(closure)


def _is_table_weight(name: str) -> bool:
    return ".embedding_bags." in name or ".embeddings." in name


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, torch.Tensor], at: dict[str, tuple[int, ...]] | None = None) -> None:
    """Copy an unsharded state dict into a (possibly sharded) model: each rank copies the slices it holds.

    Lets every layout start from identical weights, which is what layout-equivalence tests compare. With
    `at`, the copy is partial: only the keys of `full` are written, each tensor into the block of the model's
    tensor that starts at its `at` offset (0 where `at` has no entry); the rest of the model is untouched.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor
    from torchrec.distributed.shards_wrapper import LocalShardsWrapper

    state = model.state_dict()
    if at is None:
        missing = [k for k in state if k not in full]
        if missing:
            raise KeyError(f"{missing[0]} is in the model but not in the state dict to load")
    unknown = [k for k in full if k not in state]
    if unknown:
        raise KeyError(f"{unknown[0]} is in the state dict to load but not in the model")
    for key, src in full.items():
        dst, origin = state[key], (at or {}).get(key, (0,) * full[key].dim())
        if isinstance(dst, ShardedTensor):
            for shard in dst.local_shards():
                _copy_block(shard.tensor, tuple(shard.metadata.shard_offsets), src, origin)
        elif isinstance(dst, DTensor) and isinstance(dst.to_local(), LocalShardsWrapper):  # 2D sparse tables
            wrapper = dst.to_local()
            for t, offsets in zip(wrapper.local_shards(), wrapper.local_offsets(), strict=True):  # type: ignore[attr-defined]
                _copy_block(t, tuple(offsets), src, origin)
        elif isinstance(dst, DTensor):
            _copy_block(dst.to_local(), _dtensor_offsets(dst), src, origin)
        else:
            _copy_block(dst, (0,) * dst.dim(), src, origin)


def _copy_block(dst: torch.Tensor, dst_at: tuple[int, ...], src: torch.Tensor, src_at: tuple[int, ...]) -> None:
    """Copy into `dst` (a block of a global tensor starting at `dst_at`) the part of `src` (a block starting
    at `src_at`) that overlaps it."""
    lo = [max(a, b) for a, b in zip(dst_at, src_at, strict=True)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(dst_at, dst.shape, src_at, src.shape, strict=True)]
    if any(h <= s for s, h in zip(lo, hi, strict=True)):
        return
    dst[tuple(slice(s - a, h - a) for s, h, a in zip(lo, hi, dst_at, strict=True))].copy_(
        src[tuple(slice(s - b, h - b) for s, h, b in zip(lo, hi, src_at, strict=True))])


def _dtensor_offsets(t: Any) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offsets)


def unsharded_optimizer(model: SparseDenseModel, optim: OptimConfig) -> CombinedOptimizer:
    """The same optimisers as `parallelize_model`, unfused, for a plain single-process model: the
    reference that every layout must match."""
    _check_optim(optim)
    sparse = KeyedOptimizerWrapper(
        {f"sparse.{k}": v for k, v in model.sparse.named_parameters()},
        lambda params: SPARSE_OPTIMIZERS[optim.sparse](params, **sparse_optimizer_kwargs(optim)),
    )
    dense = KeyedOptimizerWrapper(
        {f"dense.{k}": v for k, v in model.dense.named_parameters()},
        lambda params: DENSE_OPTIMIZERS[optim.dense](params, lr=optim.dense_lr, weight_decay=optim.weight_decay),
    )
    return CombinedOptimizer([sparse, dense])
