"""TorchRec planner driven by the layout config, and the plan as a table a person can read."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from adsfm.contract.config import ParallelConfig


class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, offering row-wise, table-row-wise and grid sharding on CPU too.

    TorchRec lists them for CUDA only, from the days when gloo had no reduce-scatter (the output dist of
    row-wise pooled embeddings). The gloo of our pinned torch has it, and tests/distributed checks each
    of these layouts against a single process, step by step, on CPU.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t for t in super().sharding_types("cuda") if t not in types]
        return types


def sharders() -> list[ModuleSharder[nn.Module]]:
    """Pooled tables (DLRM) and sequence tables (HSTU's EmbeddingCollection)."""
    return [EmbeddingBagSharder(), EmbeddingCollectionSharder()]  # type: ignore[list-item]


def table_names(model: nn.Module) -> list[str]:
    names = []
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [c.name for c in m.embedding_bag_configs()]
        elif isinstance(m, EmbeddingCollection):
            names += [c.name for c in m.embedding_configs()]
    return names


class CostCapture(NoopEmbeddingStats):
    """Keeps the planner's estimated cost per table (the sum of its shards' perf estimates, ms)."""

    def __init__(self) -> None:
        self.est_ms: dict[str, float] = {}

    def log(self, sharding_plan: ShardingPlan, topology: Topology, batch_size: int, storage_reservation: Any,
            num_proposals: int, num_plans: int, run_time: float, best_plan: list[Any], *args: Any, **kwargs: Any) -> None:
        for so in best_plan:
            self.est_ms[so.name] = float(sum(s.perf.total for s in so.shards if s.perf is not None))


def make_plan(model: nn.Module, cfg: ParallelConfig, world_size: int, pg: dist.ProcessGroup | None) -> tuple[ShardingPlan, dict[str, float]]:
    """Ask the planner for a plan within the layout's allowed sharding types; identical on every rank.
    Also returns the planner's estimated cost per table, known on the rank that planned (rank 0)."""
    tables = table_names(model)
    constraints = {
        t: ParameterConstraints(
            sharding_types=list(cfg.tables[t].sharding_types if t in cfg.tables and cfg.tables[t].sharding_types else cfg.sharding_types),
            compute_kernels=[cfg.tables[t].compute_kernel] if t in cfg.tables and cfg.tables[t].compute_kernel else None,
            min_partition=(cfg.tables[t].column_split if t in cfg.tables else None) or cfg.column_split,
            cache_params=CacheParams(load_factor=cfg.tables[t].cache_load_factor)
            if t in cfg.tables and cfg.tables[t].cache_load_factor is not None else None,
        )
        for t in tables
    }
    stats = CostCapture()  # instead of TorchRec's long report: we print our own, shorter table
    limit: dict[str, int] = {}
    if cfg.memory_per_rank_gb is not None:
        limit["hbm_cap" if cfg.device == "cuda" else "ddr_cap"] = int(cfg.memory_per_rank_gb * 1024**3)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=cfg.device, **limit),  # type: ignore[arg-type]
        constraints=constraints,
        stats=stats,
    )
    if pg is None:
        return planner.plan(model, sharders()), stats.est_ms
    return planner.collective_plan(model, sharders(), pg), stats.est_ms


def plan_rows(plan: ShardingPlan, est_ms: dict[str, float] | None = None) -> list[dict[str, object]]:
    """One row per table: sharding type, kernel, ranks, bytes per rank (fp32), estimated cost (ms)."""
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
                    "est_ms": (est_ms or {}).get(table),
                }
            )
    return rows


def format_plan(rows: list[dict[str, object]]) -> str:
    w = max([5, *(len(str(r["table"])) for r in rows)]) + 2
    rw = max([10, *(len(str(r["ranks"])) for r in rows)]) + 1
    head = f"{'table':<{w}} {'sharding':<18} {'kernel':<8} {'ranks':<{rw}} {'est. ms':>8}  bytes per rank"
    lines = [head, "-" * len(head)]
    for r in rows:
        bpr = ", ".join(f"r{k}:{v / 1024:.0f}KiB" for k, v in sorted(r["bytes_per_rank"].items()))  # type: ignore[attr-defined]
        cost = f"{r['est_ms']:.3f}" if isinstance(r.get("est_ms"), float) else "-"
        lines.append(
            f"{r['table']!s:<{w}} {r['sharding_type']!s:<18} {r['compute_kernel']!s:<8} {str(r['ranks']):<{rw}} {cost:>8}  {bpr or 'replicated'}"
        )
    return "\n".join(lines)

