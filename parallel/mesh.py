"""One device mesh for the dense side, with named dimensions ("dp", "tp"), and where a rank sits in it.

Embedding tables are sharded over all ranks; the dense layers are replicated (or FSDP-sharded) over "dp"
and split over "tp". Ranks of one "tp" group must see the same rows, so data is cut by the "dp" coordinate
only: rank r is at (dp = r // tp, tp = r % tp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from adsfm.contract.config import ParallelConfig
from adsfm.parallel.config import dense_degrees

_MESH: DeviceMesh | None = None


@dataclass(frozen=True)
class DataCoords:
    """This rank's slice of the data: the `dp_rank`-th of `dp` equal slices; `tp` ranks share it."""

    dp_rank: int
    dp: int
    tp: int


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh | None:
    """The (dp, tp) mesh over the world, kept for data_coords(); None in a single process."""
    global _MESH
    if not dist.is_initialized():
        _MESH = None
        return None
    dp, tp = dense_degrees(cfg, dist.get_world_size())
    _MESH = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return _MESH


def data_coords() -> DataCoords:
    if not dist.is_initialized():
        return DataCoords(0, 1, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = _MESH.size(1) if _MESH is not None else 1
    return DataCoords(rank // tp, world // tp, tp)
