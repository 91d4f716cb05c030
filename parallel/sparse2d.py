"""2D sparse parallelism: tables sharded within groups of k ranks, the groups replicas of each other.

TorchRec's DMPCollection does this on CUDA only (it asserts the device). The pieces it is built from are
public and device-neutral, so this module assembles them for any device: the same (replicate, shard)
mesh and rank layout (sharding group g = ranks g, g + R, g + 2R, ... with R = world / k replicas), the
plan made for k ranks and remapped onto each group's global ranks, TorchRec's ShardingEnv2D, and a sync
that averages every table shard and its optimizer state across the replicas.

Synced after every step, replicas that each stepped with SGD on their own ranks' mean gradient end where
one process stepping on the global mean gradient would (the update is linear in the gradient); with a
stateful optimizer such as Adagrad, averaging states is TorchRec's approximation, not one process's
training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.remote_device import _remote_device
from torchrec.distributed.types import ShardingEnv2D, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer


def sparse_2d_env(world: int, group_size: int, device_type: str) -> ShardingEnv2D:
    replicas = world // group_size
    peers = [[replicas * r + g for r in range(group_size)] for g in range(replicas)]
    mesh = DeviceMesh(device_type=device_type, mesh=peers, mesh_dim_names=("replicate", "shard"))
    return ShardingEnv2D(
        sharding_pg=mesh.get_group("shard"),
        replica_pg=mesh.get_group("replicate"),
        global_pg=dist.group.WORLD,  # type: ignore[arg-type]
        device_mesh=mesh,
    )


def remap_plan(plan: ShardingPlan, rank: int, world: int, group_size: int, device_type: str) -> None:
    """A plan made for ranks 0..k-1, moved in place onto this rank's sharding group."""
    replicas = world // group_size
    group = rank % replicas
    for module_plan in plan.plan.values():
        for ps in module_plan.values():  # type: ignore[attr-defined]
            ps.ranks = [r * replicas + group for r in ps.ranks or []]
            if isinstance(ps.sharding_spec, EnumerableShardingSpec):
                for shard in ps.sharding_spec.shards:
                    r = int(shard.placement.rank()) * replicas + group  # type: ignore[union-attr, arg-type]
                    shard.placement = _remote_device(f"rank:{r}/{device_type}")


class ReplicaSync:
    """Averages table weights and fused optimizer state across the replica groups."""

    def __init__(self, model: nn.Module, env: ShardingEnv2D) -> None:
        self.pg = env.replica_pg
        self.size = dist.get_world_size(self.pg)
        self.tensors: list[torch.Tensor] = []
        for m in _kernels(model):
            self.tensors += list(m.split_embedding_weights())
            self.tensors += [s["sum"] for s in m.get_optimizer_state() if "sum" in s]
        if not self.tensors:
            raise RuntimeError("2D sparse: found no embedding kernel to sync across replicas")

    @torch.no_grad()
    def broadcast(self) -> None:
        """Make every replica start from the first one's tables (their random inits may differ)."""
        for t in self.tensors:
            dist.broadcast(t, group_src=0, group=self.pg)

    @torch.no_grad()
    def __call__(self) -> None:
        for t in self.tensors:  # gloo has no AVG: sum, then divide
            dist.all_reduce(t, group=self.pg)
            t.div_(self.size)


def _kernels(model: nn.Module) -> list[SplitTableBatchedEmbeddingBagsCodegen]:
    """The fused embedding kernels, also those a sharded module keeps in `_lookups` outside its children."""
    found: dict[int, SplitTableBatchedEmbeddingBagsCodegen] = {}
    for m in model.modules():
        for sub in [m, *getattr(m, "_lookups", [])]:
            for k in sub.modules():
                if isinstance(k, SplitTableBatchedEmbeddingBagsCodegen):
                    found[id(k)] = k
    return list(found.values())


class SyncedOptimizer(CombinedOptimizer):
    """The combined optimizer, followed by a replica sync after each step."""

    def __init__(self, optimizers: list[Any], sync: ReplicaSync) -> None:
        super().__init__(optimizers)
        self._sync = sync

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        super().step(closure)
        self._sync()
