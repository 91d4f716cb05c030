"""Criteo-format files read as a Ray Data dataset (`data.stream.reader=ray_data`): read on Ray's CPU
workers, featurized there by the one feature contract (`featurize_rows`, as the file reader and serving
do), and handed to the Ray Train workers by Ray Train's streaming split, so the balance between ranks no
longer depends on how the bytes fall into files, and the data side can run on other nodes than the trainers.

Every epoch the driver's row count of the files (parquet: from the footers; text: one counting pass) is
the epoch's `rows`; a step takes `batch_size / world` rows on every rank; what no step took (the split's
equalising remainder and each rank's last partial batch) is `not_trained`, logged like the file reader's.
A resumed run re-reads and re-featurizes the batches it skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from torchrec.datasets.utils import Batch

from adsfm.contract.config import DataConfig, StreamConfig
from adsfm.contract.features import FeatureSpec
from adsfm.training.loop import all_ranks
from adsfm.training.stream import (
    Chunk,
    EpochRows,
    _kind,
    _summed,
    columns,
    featurize_rows,
    raw_types,
    resolve,
)


def raw_dataset(s: StreamConfig) -> Any:
    """The training files as a Ray Data dataset of raw rows: label, int_*, cat_*."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    files = resolve(s.paths, "stream.paths")  # one kind of file: resolve refuses a mix
    kind = _kind(files[0])
    dense, sparse = columns(s)
    paths = [str(f) for f in files]
    if kind == "parquet":
        return ray.data.read_parquet(paths, columns=["label", *dense, *sparse])
    types = {"label": pa.int64(), **{c: pa.float64() for c in dense}, **{c: pa.string() for c in sparse}}
    return ray.data.read_csv(
        paths,
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        read_options=pacsv.ReadOptions(column_names=["label", *dense, *sparse]),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=False),
        arrow_open_stream_args={"compression": "gzip"} if kind == "gzip" else None,
    )


class Featurize:
    """`map_batches`' function: raw rows → model inputs through the feature contract."""

    def __init__(self, spec: FeatureSpec, s: StreamConfig) -> None:
        self.spec, self.dense, self.sparse = spec, *columns(s)

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        chunk = featurize_rows(raw_types(df, self.dense, self.sparse), self.spec)
        return {"dense": chunk.dense, "cats": chunk.cats, "label": chunk.labels}


def train_dataset(cfg: DataConfig, spec: FeatureSpec) -> tuple[Any, int]:
    """The featurized training dataset for Ray Train, and the files' row count."""
    raw = raw_dataset(cfg.stream)
    rows = int(raw.count())
    if rows == 0:
        raise ValueError(f"data.stream.paths {cfg.stream.paths}: no rows")
    return raw.map_batches(Featurize(spec, cfg.stream), batch_format="pandas", batch_size=8192), rows


class RayDataSource:
    """This rank's shard of the featurized dataset (`ray.train.get_dataset_shard`), in local batches."""

    def __init__(self, spec: FeatureSpec, batch_size: int, rows: int) -> None:
        self.keys = [f.name for f in spec.sparse]
        self.batch_size, self.total = batch_size, rows
        self.steps_per_epoch: int | None = None
        self.rows: EpochRows | None = None

    def epoch(self, epoch: int, rank: int, world: int, skip: int) -> Iterator[Batch]:
        import ray.train

        self.rows = None
        local = self.batch_size // world
        shard = ray.train.get_dataset_shard("train")
        taken, stopped = 0, False
        batches = shard.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2)
        for b in batches:
            if len(b["label"]) < local:  # the shard's last partial batch: read, not trained
                continue
            if stopped:
                continue  # read to the end (the split's next epoch starts only once this one is consumed)
            if not all_ranks(True):
                stopped = True  # another rank ran dry: this collective was the last of the epoch for all
                continue
            if taken >= skip:
                yield Chunk(b["dense"], b["cats"], b["label"]).batch(self.keys)
            taken += 1
        if not stopped:
            all_ranks(False)  # this rank is done: the others learn it at the same step
        trained = _summed(0, taken * local, world).trained
        self.rows = EpochRows(self.total, trained)
