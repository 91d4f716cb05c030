"""The parallel layout as configuration, validated before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass, field

# What TorchRec's planner can place on CPU workers over gloo today. row_wise / table_row_wise need a
# reduce-scatter that gloo lacks; they are CUDA-only until parallel/ grows a CPU output dist for them.
CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
ALL_SHARDING_TYPES = CPU_SHARDING_TYPES + ("row_wise", "table_row_wise", "grid_shard")
# Layouts that would train a different model than one process does, refused until they don't.
NOT_YET = {
    "data_parallel": "TorchRec steps data-parallel tables with the dense optimizer, not the configured "
    "sparse one, so the layout does not train the single-process model; use table_wise or column_wise",
}


@dataclass
class TableConstraint:
    """Per-table planner constraints."""

    sharding_types: list[str] = field(default_factory=list)
    """Allowed sharding types for this table; empty: the layout's global list."""
    compute_kernel: str | None = None
    """'fused' or 'dense'; None lets the planner choose."""
    column_split: int | None = None
    """Column width of each shard for column_wise sharding."""


@dataclass
class ParallelConfig:
    """How the job is laid out over ranks."""

    name: str = "tw2"
    num_workers: int = 2
    """Ray Train workers, one rank each."""
    backend: str = "gloo"
    """torch.distributed backend: 'gloo' on CPU, 'nccl' on CUDA."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    cpu_per_worker: float = 0.5
    """Ray CPUs per worker. Below 1 on a 2-core host so that other Ray tasks are not starved."""
    sharding_types: list[str] = field(default_factory=lambda: ["table_wise"])
    """Sharding types the planner may choose from for every table."""
    tables: dict[str, TableConstraint] = field(default_factory=dict)
    """Per-table constraints, keyed by table name."""
    data_parallel: str = "ddp"
    """Dense layers: 'ddp' (replicated, gradients all-reduced)."""


def validate_parallel(cfg: ParallelConfig, table_names: list[str]) -> None:
    """Refuse a layout this hardware or this model cannot run, naming the field and the fix."""
    if cfg.num_workers < 1:
        raise ValueError(f"parallel.num_workers={cfg.num_workers}: must be >= 1")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"parallel.device={cfg.device!r}: use 'cpu' or 'cuda'")
    if cfg.device == "cpu" and cfg.backend != "gloo":
        raise ValueError(f"parallel.backend={cfg.backend!r} on device=cpu: only 'gloo' runs on CPU")
    if cfg.data_parallel != "ddp":
        raise ValueError(f"parallel.data_parallel={cfg.data_parallel!r}: only 'ddp' is implemented")
    allowed: tuple[str, ...] = CPU_SHARDING_TYPES if cfg.device == "cpu" else ALL_SHARDING_TYPES
    allowed = tuple(t for t in allowed if t not in NOT_YET)
    unknown_tables = sorted(set(cfg.tables) - set(table_names))
    if unknown_tables:
        raise ValueError(
            f"parallel.tables names {unknown_tables}, which the model does not have; tables: {sorted(table_names)}"
        )
    checks = [("parallel.sharding_types", cfg.sharding_types)] + [
        (f"parallel.tables.{t}.sharding_types", c.sharding_types) for t, c in cfg.tables.items()
    ]
    for where, types in checks:
        for st in types:
            if st not in ALL_SHARDING_TYPES:
                raise ValueError(f"{where}: unknown sharding type {st!r}; choose from {list(ALL_SHARDING_TYPES)}")
            if st in NOT_YET:
                raise ValueError(f"{where}: {st!r} is not supported yet: {NOT_YET[st]}")
            if st not in allowed:
                raise ValueError(
                    f"{where}: {st!r} cannot run on device={cfg.device}: TorchRec's {st} needs a reduce-scatter "
                    f"that gloo lacks; use one of {list(CPU_SHARDING_TYPES)} or device=cuda"
                )
    if not cfg.sharding_types and any(not c.sharding_types for c in cfg.tables.values()):
        raise ValueError("parallel.sharding_types is empty: list at least one sharding type")
