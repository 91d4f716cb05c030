"""Managed collision (`model.tables.<table>.collision=managed`): each id gets a row of its own while the
table has room, the rows freed for new ids by LRU or LFU eviction.

TorchRec's MCHManagedCollisionModule (torchrec.modules.mc_modules) decides which ids hold rows: every
training batch's ids are profiled, and every `eviction_interval` steps the ids seen most are admitted into
free or evicted rows. The remap itself is the feature contract's (adsfm.contract.features): an id a row
holds takes that row, any other the unknown row 0 (torchrec would send it to the last managed row, which
belongs to an id), and the missing row stays as it is. The same remap, `slot_keys` in the bundle's
feature spec and `<table>.keys` in each delta, is what serving looks up.

The features hold ids (managed_id of each key) until `remap` turns them into rows, at every
FeatureSet.take. On several ranks, every rank profiles the ids of all ranks' batches in rank order (one
all_gather per step), so every rank's module holds the same remap without a broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from adsfm.contract.features import OOV_ROW, FeatureSpec, TableSpec


def _module(name: str, t: TableSpec) -> MCHManagedCollisionModule:
    policy = LRU_EvictionPolicy() if t.eviction == "lru" else LFU_EvictionPolicy()
    return MCHManagedCollisionModule(zch_size=t.managed, device=torch.device("cpu"), eviction_policy=policy,
                                     eviction_interval=t.eviction_interval, output_global_offset=t.first, name=name)


class ManagedIds(nn.Module):
    """The remap of every managed table of a spec; its state (the buffers) is checkpointed with the model."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tables = nn.ModuleDict({name: _module(name, t) for name, t in spec.tables.items() if t.managed})
        self.features = {name: [f.name for f in spec.sparse if f.table == name] for name in self.tables}
        self.table_of = {f: name for name, fs in self.features.items() for f in fs}
        self._evicted: dict[str, list[torch.Tensor]] = {}
        for name, t in spec.tables.items():  # a spec that already holds a remap (a bundle's) starts from it
            if t.managed and any(k >= 0 for k in t.slot_keys):
                self.load_slots(name, np.array(t.slot_keys, np.int64))

    def module(self, table: str) -> MCHManagedCollisionModule:
        return cast(MCHManagedCollisionModule, self.tables[table])

    def __bool__(self) -> bool:
        return bool(len(self.tables))

    @torch.no_grad()
    def remap(self, kjt: KeyedJaggedTensor, train: bool = False) -> KeyedJaggedTensor:
        """Ids → rows of every managed table's features; `train`: the ids are profiled first (collectively
        on several ranks), so the ids of this batch may be admitted before they are looked up."""
        jts = kjt.to_dict()
        for table in self.tables:
            module = self.module(table)
            names = [n for n in self.features[table] if n in jts]
            if not names:
                continue
            if train:
                seen = torch.cat([jts[n].values() for n in names])
                seen = _everyones(seen[seen >= self.spec.tables[table].first])  # the missing row is no id
                batch = {table: JaggedTensor(values=seen, lengths=torch.zeros(0, dtype=torch.int32))}
                if module._current_history_buffer_offset == 0 and \
                        module._input_history_buffer_size < seen.numel() * module._eviction_interval * 1.25:
                    module._init_history_buffers(batch)  # torchrec sizes it by the first batch: a later, larger one would be cut
                module.profile(batch)
                evicted = module.evict()
                if evicted is not None and len(evicted):
                    self._evicted.setdefault(table, []).append(evicted.long())
            for n in names:
                jts[n] = JaggedTensor(values=self.rows(table, jts[n].values()), lengths=jts[n].lengths())
        return KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in kjt.keys()})  # noqa: SIM118

    def rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The contract's remap: the row holding each id, the unknown row for an id none holds; values below
        the table's first managed row (the unknown and missing rows) are rows already."""
        m = self.module(table)
        first = self.spec.tables[table].first
        sorted_ids, rows = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping
        at = torch.searchsorted(sorted_ids, ids).clamp(max=len(sorted_ids) - 1)
        hit = sorted_ids[at] == ids
        out = torch.where(hit, rows[at], torch.full_like(ids, OOV_ROW))
        return torch.where(ids < first, ids, out)

    def slot_keys(self, table: str) -> np.ndarray:
        """The id each managed row holds (-1: free), row first + i at i: what the bundle and deltas carry."""
        m = self.module(table)
        first = self.spec.tables[table].first
        out = np.full(m._zch_size, -1, np.int64)
        ids, rows = m._mch_sorted_raw_ids.numpy(), m._mch_remapped_ids_mapping.numpy()
        held = ids != torch.iinfo(torch.int64).max
        out[rows[held] - first] = ids[held]
        return out

    @torch.no_grad()
    def load_slots(self, table: str, keys: np.ndarray) -> None:
        """Start a table's remap from slot keys (an exported bundle's), its eviction metadata fresh."""
        m = self.module(table)
        first = self.spec.tables[table].first
        ids = torch.from_numpy(np.where(keys >= 0, keys, torch.iinfo(torch.int64).max).astype(np.int64))
        m._mch_sorted_raw_ids.copy_(ids)
        m._mch_remapped_ids_mapping.copy_(torch.arange(first, first + len(keys)))
        m._sort_mch_buffers()

    def evicted(self) -> dict[str, torch.Tensor]:
        """Rows whose id was evicted since the last call (they now hold a new id, or none)."""
        out = {t: torch.cat(parts).unique() for t, parts in self._evicted.items()}
        self._evicted = {}
        return out

    def spec_with_slots(self) -> FeatureSpec:
        """The spec with every managed table's remap as it is now: what export writes into the bundle."""
        spec = self.spec.model_copy(deep=True)
        for name in self.tables:
            spec.tables[name].slot_keys = self.slot_keys(name).tolist()
        return spec


def _everyones(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ids, in rank order, on every rank (this rank's alone in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ids
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, ids.numpy())
    return torch.from_numpy(np.concatenate(parts))


@torch.no_grad()
def reset_rows(shards: dict[str, tuple[torch.Tensor, int]], rows: dict[str, torch.Tensor]) -> None:
    """Zero the rows a new id took over (as TorchRec's sharded managed-collision tables do; the optimizer
    state of the row is kept), in whichever shard of the table this rank holds (`table_shards`): the new id
    starts from nothing, not from the evicted id's vector."""
    for table, (weight, offset) in shards.items():
        r = rows.get(table)
        if r is None:
            continue
        local = r[(r >= offset) & (r < offset + weight.shape[0])] - offset
        weight[local] = 0


def fresh_rows(batches: Iterator[Any], managed: ManagedIds | None, model: nn.Module) -> Iterator[Any]:
    """`batches` (taken with train=True), each let through once the rows its remap gave to new ids are
    zeroed; without managed tables, `batches` itself."""
    if not managed:
        yield from batches
        return
    shards = table_shards(model)
    for b in batches:
        reset_rows(shards, managed.evicted())
        yield b


def table_shards(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each table's rows as this rank holds them (live views of the fused tables), with their first global
    row; an unsharded model's whole tables."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for key, w in model.state_dict().items():
        if key.startswith("sparse.embedding_bags.") and key.endswith(".weight"):
            table = key.removeprefix("sparse.embedding_bags.").removesuffix(".weight")
            shard = w.local_shards()[0] if hasattr(w, "local_shards") and w.local_shards() else None
            out[table] = (shard.tensor, shard.metadata.shard_offsets[0]) if shard else (w, 0)
    return out
