"""Checks of the parallel layout (adsfm.contract.config.ParallelConfig) that run before any worker starts."""

from __future__ import annotations

from adsfm.contract.config import ParallelConfig, ShardingType

ALL_SHARDING_TYPES = tuple(ShardingType)
# Row-wise and table-row-wise run on CPU workers over gloo too (parallel/plan.py: EmbeddingBagSharder),
# checked against a single process. grid_shard runs there but does not match it (its first forward
# already differs from one process), so CPU refuses it.
CPU_SHARDING_TYPES = tuple(t for t in ALL_SHARDING_TYPES if t != ShardingType.grid_shard)


def dense_degrees(cfg: ParallelConfig, world: int) -> tuple[int, int]:
    """(dp, tp) with -1 resolved; raises with the arithmetic when they do not fill the world."""
    if cfg.tp < 1:
        raise ValueError(f"parallel.tp={cfg.tp}: must be >= 1")
    if cfg.dp == -1:
        if world % cfg.tp:
            raise ValueError(f"parallel.num_workers({world}) % parallel.tp({cfg.tp}) = {world % cfg.tp} != 0: "
                             f"use a tp that divides {world}")
        return world // cfg.tp, cfg.tp
    if cfg.dp < 1 or cfg.dp * cfg.tp != world:
        raise ValueError(f"parallel.dp({cfg.dp}) * parallel.tp({cfg.tp}) = {cfg.dp * cfg.tp} != "
                         f"parallel.num_workers({world}): set dp=-1 to take the remaining ranks")
    return cfg.dp, cfg.tp


COLUMN_SPLITTING = (ShardingType.column_wise, ShardingType.table_column_wise, ShardingType.grid_shard)


def validate_parallel(cfg: ParallelConfig, table_names: list[str], embedding_dim: int | None = None,
                      sparse_optimizer: str | None = None) -> None:
    """Refuse a layout this hardware or this model cannot run, naming the field and the fix."""
    if cfg.num_workers < 1:
        raise ValueError(f"parallel.num_workers={cfg.num_workers}: must be >= 1")
    if cfg.device == "cpu" and cfg.backend != "gloo":
        raise ValueError(f"parallel.backend={cfg.backend} on device=cpu: only 'gloo' runs on CPU")
    dp, tp = dense_degrees(cfg, cfg.num_workers)
    if cfg.sparse_group:
        k, w = cfg.sparse_group, cfg.num_workers
        if k < 1 or w % k or k == w:
            raise ValueError(
                f"parallel.sparse_group({k}): must divide parallel.num_workers({w}) into 2 or more groups "
                f"(num_workers % sparse_group = {w % k if k >= 1 else '-'}); 0 shards over all ranks"
            )
        if tp > 1:
            raise ValueError(f"parallel.sparse_group({k}) with parallel.tp({tp}) > 1: 2D sparse and tensor parallel "
                             "do not combine yet; choose one")
    if tp > 1 and cfg.data_parallel != "fsdp":
        raise ValueError(
            f"parallel.tp({tp}) > 1 with parallel.data_parallel=ddp: DDP does not compose with tensor parallel; "
            "use parallel.data_parallel=fsdp"
        )
    allowed: tuple[str, ...] = CPU_SHARDING_TYPES if cfg.device == "cpu" else ALL_SHARDING_TYPES
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
            if st not in allowed:
                raise ValueError(
                    f"{where}: {st} cannot run on device={cfg.device}: on CPU over gloo it does not train the "
                    f"single-process model; use one of {[str(t) for t in CPU_SHARDING_TYPES]} or device=cuda"
                )
    if not cfg.sharding_types and any(not c.sharding_types for c in cfg.tables.values()):
        raise ValueError("parallel.sharding_types is empty: list at least one sharding type")
    if sparse_optimizer == "rowwise_adagrad" and embedding_dim:
        # Row-wise Adagrad keeps one accumulator per row, from the mean square of the row's gradient; a
        # column shard sees only its columns, so its accumulator differs and training diverges from one
        # process.
        for where, types, split in checks_with_split(cfg, table_names):
            if split is not None and split < embedding_dim and any(t in COLUMN_SPLITTING for t in types):
                raise ValueError(
                    f"{where} allows column-splitting types with column_split({split}) < model.embedding_dim"
                    f"({embedding_dim}) and train.sparse_optimizer=rowwise_adagrad: each column shard would keep "
                    "its own row state, a different optimizer than one process; use train.sparse_optimizer=adagrad "
                    "(or sgd), or a layout that keeps rows whole (table_wise, row_wise)"
                )


def checks_with_split(cfg: ParallelConfig, table_names: list[str]) -> list[tuple[str, list[ShardingType], int | None]]:
    """(where, allowed sharding types, column split) of every table, named as the config names it."""
    out = []
    for t in table_names:
        c = cfg.tables.get(t)
        types = list(c.sharding_types) if c is not None and c.sharding_types else list(cfg.sharding_types)
        split = (c.column_split if c is not None else None) or cfg.column_split
        where = f"parallel.tables.{t}" if c is not None and (c.sharding_types or c.column_split) else "parallel.sharding_types"
        out.append((where, types, split))
    return out
