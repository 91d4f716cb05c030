"""TorchRec planner driven by the layout config, and the plan as a table a person can read."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from parallel.config import ParallelConfig


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingBagCollectionSharder()]  # type: ignore[list-item]


def make_plan(model: nn.Module, cfg: ParallelConfig, world_size: int, pg: dist.ProcessGroup | None) -> ShardingPlan:
    """Ask the planner for a plan within the layout's allowed sharding types; identical on every rank."""
    tables = [c.name for m in model.modules() if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()]
    constraints = {
        t: ParameterConstraints(
            sharding_types=list(cfg.tables[t].sharding_types if t in cfg.tables and cfg.tables[t].sharding_types else cfg.sharding_types),
            compute_kernels=[cfg.tables[t].compute_kernel] if t in cfg.tables and cfg.tables[t].compute_kernel else None,
            min_partition=cfg.tables[t].column_split if t in cfg.tables else None,
        )
        for t in tables
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=cfg.device),
        constraints=constraints,
        stats=NoopEmbeddingStats(),  # we print our own, shorter table
    )
    if pg is None:
        return planner.plan(model, sharders())
    return planner.collective_plan(model, sharders(), pg)


def plan_rows(plan: ShardingPlan) -> list[dict[str, object]]:
    """One row per table: sharding type, kernel, ranks, bytes per rank (fp32)."""
    rows = []
    for module_path, params in plan.plan.items():
        for table, ps in params.items():  # type: ignore[attr-defined]
            per_rank: dict[int, int] = {}
            for shard in ps.sharding_spec.shards if ps.sharding_spec is not None else []:
                rank = shard.placement.rank()
                n = 1
                for s in shard.shard_sizes:
                    n *= s
                per_rank[rank] = per_rank.get(rank, 0) + n * 4
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks or []),
                    "bytes_per_rank": per_rank,
                }
            )
    return rows


def format_plan(rows: list[dict[str, object]]) -> str:
    w = max([5, *(len(str(r["table"])) for r in rows)]) + 2
    head = f"{'table':<{w}} {'sharding':<18} {'kernel':<8} {'ranks':<10} bytes per rank"
    lines = [head, "-" * len(head)]
    for r in rows:
        bpr = ", ".join(f"r{k}:{v / 1024:.0f}KiB" for k, v in sorted(r["bytes_per_rank"].items()))  # type: ignore[attr-defined]
        lines.append(f"{r['table']!s:<{w}} {r['sharding_type']!s:<18} {r['compute_kernel']!s:<8} {str(r['ranks']):<10} {bpr or 'replicated'}")
    return "\n".join(lines)

