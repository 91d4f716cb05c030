"""Every row of the files is accounted for on 2 and 4 ranks (gloo processes running the workers' own
CriteoSource.epoch) over unequal files, one large gzip and several small ones. Rows = the rows in the files,
trained = steps x batch size, the same figures on every rank. Striped (the default), every rank reads
every file and keeps its lines: all but the last partial batch and a line per file and rank is trained.
Whole files per rank: the ranks stop together when the smallest share runs dry, and the count says how
much that left (read from what the other ranks still held)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.distributed
BATCH = 256
ROWS = [6000, 1200, 1100, 900, 800]  # one large gzip file and several small ones


def _rank(rank: int, world: int, port: int, files: list[str], split: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from omegaconf import OmegaConf

    from adsfm.contract.config import DataConfig, StreamConfig
    from adsfm.training.stream import CriteoSource, criteo_spec

    cfg = OmegaConf.structured(DataConfig(source="criteo", stream=StreamConfig(hash_buckets=100, chunk_bytes=1 << 14,
                                                                               gzip_split=split)))  # type: ignore[arg-type]
    cfg.stream.paths, cfg.stream.holdout_paths = files, files[-1:]
    source = CriteoSource(cfg, criteo_spec(cfg), BATCH)
    steps = sum(1 for _ in source.epoch(0, rank, world, skip=0))
    assert source.rows is not None
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "rows": source.rows.rows, "trained": source.rows.trained}))
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "split"), [(2, "striped"), (4, "striped"), (4, "whole")])
def test_every_row_is_trained_or_counted_as_not(world: int, split: str, tmp_path: Path) -> None:
    from adsfm.training.stream import unread_share, write_synthetic_criteo

    files = [str(write_synthetic_criteo(tmp_path / f"day_{i}.gz", n, seed=i)) for i, n in enumerate(ROWS)]
    mp.start_processes(_rank, args=(world, free_port(), files, split, str(tmp_path)), nprocs=world, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(g == got[0] for g in got), got  # every rank took the same steps and reports the same counts
    g = got[0]
    assert g["rows"] == sum(ROWS)
    assert g["trained"] == g["steps"] * BATCH
    untrained = g["rows"] - g["trained"]
    if split == "striped":  # the last partial global batch, and shares that differ by a line per file
        assert untrained < BATCH + world * len(ROWS)
    else:  # whole files: the rank with the fewest rows sets the steps; the others' surplus is counted
        assert untrained > BATCH and unread_share([Path(f) for f in files], world, split) > 0.05
    print(f"{split}, {world} ranks: {g['rows']} rows, {g['trained']} trained in {g['steps']} steps, {untrained} not")
