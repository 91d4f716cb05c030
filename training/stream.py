"""Where a worker's training batches come from: rows held in memory, or Criteo-format files streamed.

Criteo format: one example per line, tab-separated: the label, `num_dense` integer columns and `num_sparse`
categorical columns (32-bit hex strings); any column may be empty. The same layout in parquet has the
columns `label, int_0.., cat_0..`. Files are read in the configured order and split across workers so that
no worker reads another's bytes:

- plain text: the files, taken as one byte stream, are cut into `world` equal byte ranges; a line belongs to
  the range holding its first byte (each reader skips the partial line it starts in, and finishes the line
  it ends in), so every line is read exactly once and the ranks' shares differ by at most one line's bytes;
- gzip: a file cannot be entered in the middle. `gzip_split=striped` (the default): every rank reads every
  file and keeps every world-th line, starting at its rank (shares equal to a line per file; each rank
  decompresses all the bytes); `whole`: files are dealt out whole, largest first, to the rank with the
  fewest bytes so far (each file decompressed once, shares as unequal as the files);
- parquet: the rows, taken in file order, are cut into `world` equal shares; a rank reads only the row
  groups that overlap its share.

Rows become model inputs through the feature contract (adsfm.contract.features), exactly as serving
featurizes a raw request: categorical values are hashed into `buckets` rows after the two reserved ones
(an empty value is missing: the missing row); dense values get log1p (negatives count as 0) and are
standardised with statistics from the first `stats_rows` training rows; a missing one is the mean.
"""

from __future__ import annotations

import glob
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsfm.contract.config import (
    DataConfig,
    DataSource,
    DenseFeature,
    Side,
    SparseFeature,
    StreamConfig,
    StreamReader,
    typed,
)
from adsfm.contract.features import FeatureSpec, labels
from adsfm.training.data import FeatureSet, featurize_frame, iter_batches, learn_spec
from adsfm.training.loop import all_ranks


def columns(s: StreamConfig) -> tuple[list[str], list[str]]:
    return [f"int_{j}" for j in range(s.num_dense)], [f"cat_{j}" for j in range(s.num_sparse)]


def buckets(s: StreamConfig) -> list[int]:
    if s.num_embeddings_per_feature:
        if len(s.num_embeddings_per_feature) != s.num_sparse:
            raise ValueError(
                f"data.stream.num_embeddings_per_feature has {len(s.num_embeddings_per_feature)} entries != "
                f"data.stream.num_sparse({s.num_sparse}): give one per categorical column, or none"
            )
        return list(s.num_embeddings_per_feature)
    return [s.hash_buckets] * s.num_sparse


def criteo_data_config(cfg: DataConfig) -> DataConfig:
    """The feature declarations a Criteo-format source implies (what the manifest and serving see)."""
    out = typed(DataConfig, cfg)
    dense, sparse = columns(cfg.stream)
    items = set(cfg.stream.item_columns)
    unknown = sorted(items - set(dense) - set(sparse))
    if unknown:
        raise ValueError(f"data.stream.item_columns names {unknown}, which are not columns of this source: "
                         f"int_0..int_{len(dense) - 1}, cat_0..cat_{len(sparse) - 1}")
    side = {n: Side.item if n in items else Side.user for n in dense + sparse}
    out.sparse = [SparseFeature(name=n, hash_buckets=b, side=side[n]) for n, b in zip(sparse, buckets(cfg.stream), strict=True)]
    out.dense = [DenseFeature(name=n, log1p=True, side=side[n]) for n in dense]
    out.label = "label"
    return out


def resolve(patterns: list[str], field: str) -> list[Path]:
    """Files named by `patterns` (globs expanded, sorted per pattern, pattern order kept)."""
    if not patterns:
        raise ValueError(f"data.{field} is empty: list the Criteo-format files (globs allowed), e.g. data.{field}=[/data/day_0.gz]")
    files: list[Path] = []
    for p in patterns:
        hits = sorted(glob.glob(str(Path(p).expanduser())))
        if not hits:
            raise FileNotFoundError(f"data.{field}: {p!r} matches no file")
        files.extend(Path(h) for h in hits)
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data.{field} mixes {sorted(kinds)} files: use one format per list")
    return files


def _kind(path: Path) -> str:
    if path.suffix in (".parquet", ".pq"):
        return "parquet"
    return "gzip" if path.suffix == ".gz" else "text"


@dataclass(frozen=True)
class Piece:
    """[start, end) of one file: bytes for text, rows for parquet; end=-1 means to the end (gzip), of which
    `stripe` (rank, world) keeps the lines whose number % world == rank."""

    path: Path
    start: int
    end: int
    stripe: tuple[int, int] | None = None


def gzip_owners(files: list[Path], world: int) -> dict[Path, int]:
    """Which rank reads each gzip file: whole files, largest first, to the rank with the fewest bytes so
    far. Fewer files than ranks is an error: a rank without a file would stop every rank at step 0."""
    if len(files) < world:
        raise ValueError(
            f"data.stream.paths: {len(files)} gzip file(s) for {world} data-parallel ranks: a gzip file cannot be "
            f"split, so {world - len(files)} rank(s) would have nothing to read and every rank would stop at step 0; "
            f"give at least {world} files (or plain TSV or parquet, which are split by bytes and rows)"
        )
    load = [0] * world
    owner: dict[Path, int] = {}
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        r = int(np.argmin(load))
        owner[f] = r
        load[r] += f.stat().st_size
    return owner


def unread_share(files: list[Path], world: int, gzip_split: str = "striped") -> float:
    """The share of the training bytes never read in an epoch because ranks stop together when the one
    with the smallest share runs dry: 0 for text, parquet and striped gzip (equal shares, up to a line per
    file), and for whole gzip files 1 - world * smallest share / total (compressed bytes stand for rows)."""
    if _kind(files[0]) != "gzip" or gzip_split == "striped":
        return 0.0
    owner = gzip_owners(files, world)
    load = [sum(f.stat().st_size for f, r in owner.items() if r == k) for k in range(world)]
    return 1.0 - world * min(load) / max(sum(load), 1)


def rank_pieces(files: list[Path], rank: int, world: int, gzip_split: str = "striped") -> list[Piece]:
    """This rank's share of `files` (see the module docstring for how each format is split)."""
    kind = _kind(files[0])
    if kind == "gzip" and (gzip_split == "striped" or world == 1):
        return [Piece(f, 0, -1, stripe=(rank, world) if world > 1 else None) for f in files]
    if kind == "gzip":
        owner = gzip_owners(files, world)
        return [Piece(f, 0, -1) for f in files if owner[f] == rank]
    if kind == "parquet":
        import pyarrow.parquet as pq

        sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    else:
        sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    lo, hi = total * rank // world, total * (rank + 1) // world
    pieces, base = [], 0
    for f, n in zip(files, sizes, strict=True):
        s, e = max(lo - base, 0), min(hi - base, n)
        if s < e:
            pieces.append(Piece(f, s, e))
        base += n
    return pieces


def _text_lines(piece: Piece, chunk_bytes: int) -> Iterator[bytes]:
    """Blocks of whole lines whose first byte lies in [start, end)."""
    opener = gzip.open if piece.end < 0 else open
    end = piece.end if piece.end >= 0 else float("inf")
    with opener(piece.path, "rb") as f:
        if piece.start > 0:
            f.seek(piece.start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous range
        pos, carry = f.tell(), b""
        while pos < end:
            data = f.read(int(min(chunk_bytes, end - pos)))
            if not data:
                break
            pos += len(data)
            data = carry + data
            carry = b""
            if pos >= end:
                if not data.endswith(b"\n"):
                    data += f.readline()  # the last line started inside the range: finish it
                yield data
                return
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield data[:cut]
        if carry:
            yield carry  # the file's last line, without a newline


def read_piece(piece: Piece, s: StreamConfig) -> Iterator[pd.DataFrame]:
    """Frames of raw rows: label (int), int_* (float, NaN where empty), cat_* (str, '' where empty)."""
    dense, sparse = columns(s)
    if _kind(piece.path) == "parquet":
        yield from _parquet_rows(piece, s, dense, sparse)
        return
    names = ["label", *dense, *sparse]
    dtypes: dict[str, Any] = {"label": np.int64, **{c: np.float64 for c in dense}, **{c: str for c in sparse}}
    seen = 0  # lines of the file so far (a stripe keeps those whose number % world == rank)
    for block in _text_lines(piece, s.chunk_bytes):
        if piece.stripe is not None:
            block, seen = _stripe(block, seen, *piece.stripe)
            if not block:
                continue
        lines = block.count(b"\n") + (not block.endswith(b"\n"))
        if block.count(b"\t") != lines * (len(names) - 1):  # pandas pads short lines silently
            bad = next(ln for ln in block.split(b"\n") if ln and ln.count(b"\t") != len(names) - 1)
            fields = bad.count(b"\t") + 1
            raise ValueError(
                f"{piece.path}: a line has {fields} tab-separated fields, not {len(names)} "
                f"(label + data.stream.num_dense={s.num_dense} + num_sparse={s.num_sparse}): {bad[:120]!r}"
            )
        try:
            df = pd.read_csv(
                io.BytesIO(block), sep="\t", header=None, names=names, dtype=dtypes, keep_default_na=False,
                na_values={c: [""] for c in dense}, engine="c", index_col=False,
            )
        except (ValueError, pd.errors.ParserError) as e:
            raise ValueError(
                f"{piece.path}: not Criteo format with data.stream.num_dense={s.num_dense} and "
                f"num_sparse={s.num_sparse} (label, {s.num_dense} integers, {s.num_sparse} categoricals, tab-separated): {e}"
            ) from e
        yield df


def _stripe(block: bytes, seen: int, rank: int, world: int) -> tuple[bytes, int]:
    """The lines of `block` (whole lines, the file's lines `seen`.. onwards) whose number % world == rank,
    and the count of lines seen after it."""
    lines = block.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    mine = lines[(rank - seen) % world :: world]
    return (b"\n".join(mine) + b"\n" if mine else b""), seen + len(lines)


def _parquet_rows(piece: Piece, s: StreamConfig, dense: list[str], sparse: list[str]) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    missing = {"label", *dense, *sparse} - set(pf.schema_arrow.names)
    if missing:
        raise ValueError(f"{piece.path}: parquet lacks the Criteo columns {sorted(missing)[:5]}…")
    base = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        s_, e_ = max(piece.start - base, 0), min(piece.end - base, n)
        base += n
        if s_ >= e_:
            continue
        t = pf.read_row_group(g, columns=["label", *dense, *sparse]).slice(s_, e_ - s_)
        yield raw_types(t.to_pandas(), dense, sparse)


def raw_types(df: pd.DataFrame, dense: list[str], sparse: list[str]) -> pd.DataFrame:
    """Columnar rows (parquet, Ray Data) as the text reader types them: int_* float (NaN where empty),
    cat_* str ('' where empty), label int."""
    for c in dense:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    for c in sparse:
        df[c] = df[c].fillna("").astype(str)
    df["label"] = df["label"].astype(np.int64)
    return df


def read_rows(files: list[Path], s: StreamConfig, limit: int) -> pd.DataFrame:
    """The first `limit` rows of `files`, in order."""
    frames, n = [], 0
    for piece in rank_pieces(files, 0, 1):
        for df in read_piece(piece, s):
            frames.append(df)
            n += len(df)
            if n >= limit:
                return pd.concat(frames, ignore_index=True).iloc[:limit]
    if not frames:
        raise ValueError(f"{files[0]}: no rows")
    return pd.concat(frames, ignore_index=True)


@dataclass
class Chunk:
    dense: np.ndarray  # [n, num_dense] float32, standardised
    cats: np.ndarray  # [n, num_sparse] int64 table rows
    labels: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return len(self.labels)

    def cut(self, n: int) -> tuple[Chunk, Chunk]:
        return (Chunk(self.dense[:n], self.cats[:n], self.labels[:n]), Chunk(self.dense[n:], self.cats[n:], self.labels[n:]))

    @staticmethod
    def join(a: Chunk, b: Chunk) -> Chunk:
        return Chunk(np.concatenate([a.dense, b.dense]), np.concatenate([a.cats, b.cats]), np.concatenate([a.labels, b.labels]))

    def batch(self, keys: list[str]) -> Batch:
        n, m = self.cats.shape
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.ascontiguousarray(self.cats.T).reshape(-1)),  # key-major, one value per row
            lengths=torch.ones(n * m, dtype=torch.int32),
        )
        return Batch(dense_features=torch.from_numpy(self.dense), sparse_features=kjt, labels=torch.from_numpy(self.labels))


def featurize_rows(df: pd.DataFrame, spec: FeatureSpec) -> Chunk:
    """Raw Criteo rows → a chunk of model inputs, through the feature contract."""
    dense, sparse = featurize_frame(df, spec)
    cats = np.stack([sparse[f.name][0] for f in spec.sparse], axis=1) if spec.sparse else np.zeros((len(df), 0), np.int64)
    return Chunk(dense, cats, labels(df["label"], "label"))


def criteo_spec(cfg: DataConfig) -> FeatureSpec:
    """The feature spec of a Criteo-format source: its declared features, hashed tables, and dense
    statistics from the first stats_rows training rows."""
    s = cfg.stream
    declared = criteo_data_config(cfg)  # first: a bad declaration fails before any file is read
    head = read_rows(resolve(s.paths, "stream.paths"), s, s.stats_rows)
    return learn_spec(head, declared, np.arange(len(head)))


def criteo_holdout_frame(cfg: DataConfig) -> pd.DataFrame:
    """The first holdout_rows holdout rows, raw (training rows are streamed, never held)."""
    s = cfg.stream
    return read_rows(resolve(s.holdout_paths, "stream.holdout_paths"), s, s.holdout_rows)


def criteo_features(cfg: DataConfig) -> FeatureSet:
    """The holdout sample featurized, with the source's spec; no training rows."""
    spec = criteo_spec(cfg)
    c = featurize_rows(criteo_holdout_frame(cfg), spec)
    sparse = {f.name: (c.cats[:, j].copy(), np.ones(len(c), np.int32)) for j, f in enumerate(spec.sparse)}
    return FeatureSet(dense=c.dense, sparse=sparse, labels=c.labels, train_idx=np.zeros(0, np.int64),
                      holdout_idx=np.arange(len(c), dtype=np.int64), users=None, times=None, spec=spec)


# ------------------------------------------------------------------------------------------ batch sources


@dataclass(frozen=True)
class EpochRows:
    """What an epoch did with the training rows, over all ranks: every row of the source is either trained
    or not (the ragged last batch; for a stream, also what the other ranks still held when the first ran
    dry, counted by reading the rest of their shares without featurizing it)."""

    rows: int
    trained: int

    @property
    def not_trained(self) -> int:
        return self.rows - self.trained


class BatchSource(Protocol):
    steps_per_epoch: int | None
    """None when the length of an epoch is only known once it is read (a stream)."""
    rows: EpochRows | None
    """The last epoch's row count, once the epoch has been read to its end (None if it stopped early, at
    train.max_steps)."""

    def epoch(self, epoch: int, rank: int, world: int, skip: int) -> Iterator[Batch]:
        """This rank's batches of `epoch`, after skipping the first `skip` (a resumed run). Every rank
        yields the same number of batches."""
        ...


class MemorySource:
    """Rows of a FeatureSet, reshuffled every epoch with seed + epoch."""

    def __init__(self, fs: FeatureSet, batch_size: int, seed: int) -> None:
        self.fs, self.batch_size, self.seed = fs, batch_size, seed
        self.steps_per_epoch: int | None = len(fs.train_idx) // batch_size
        self.rows: EpochRows | None = None

    def epoch(self, epoch: int, rank: int, world: int, skip: int) -> Iterator[Batch]:
        self.rows = None
        for i, rows in enumerate(iter_batches(self.fs.train_idx, self.batch_size, rank, world, seed=self.seed + epoch)):
            if i >= skip:
                yield self.fs.take(rows, train=True)
        self.rows = EpochRows(len(self.fs.train_idx), (self.steps_per_epoch or 0) * self.batch_size)


class CriteoSource:
    """Criteo-format files streamed in file order, this rank reading only its share. Ranks stop together
    when the first runs out (their shares differ by at most a line, or by a file's size for gzip)."""

    def __init__(self, cfg: DataConfig, spec: FeatureSpec, batch_size: int) -> None:
        self.cfg, self.spec, self.batch_size = cfg.stream, spec, batch_size
        self.files = resolve(self.cfg.paths, "stream.paths")
        self.keys = [f.name for f in spec.sparse]
        self.steps_per_epoch: int | None = None
        self.rows: EpochRows | None = None

    def frames(self, rank: int, world: int) -> Iterator[pd.DataFrame]:
        """This rank's share of the files as raw frames, in order."""
        for piece in rank_pieces(self.files, rank, world, self.cfg.gzip_split):
            yield from read_piece(piece, self.cfg)

    def local_batches(self, rank: int, world: int, frames: Iterator[pd.DataFrame] | None = None) -> Iterator[Chunk]:
        local = self.batch_size // world
        held: Chunk | None = None
        for df in self.frames(rank, world) if frames is None else frames:
            c = featurize_rows(df, self.spec)
            held = c if held is None else Chunk.join(held, c)
            while len(held) >= local:
                out, held = held.cut(local)
                yield out

    def epoch(self, epoch: int, rank: int, world: int, skip: int) -> Iterator[Batch]:
        self.rows = None
        frames = _Counted(self.frames(rank, world))
        taken, stopped = 0, False
        for chunk in self.local_batches(rank, world, frames):
            if not all_ranks(True):
                stopped = True  # another rank ran dry: this collective was the last of the epoch for all
                break
            if taken >= skip:
                yield chunk.batch(self.keys)
            taken += 1
        if not stopped:
            all_ranks(False)  # this rank is done: the others learn it at the same step
        for _ in frames:  # the rest of this rank's share, counted, not featurized: rows no step took
            pass
        self.rows = _summed(frames.rows, taken * (self.batch_size // world), world)


class _Counted:
    """An iterator of frames that counts their rows."""

    def __init__(self, frames: Iterator[pd.DataFrame]) -> None:
        self.frames, self.rows = frames, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> pd.DataFrame:
        df = next(self.frames)
        self.rows += len(df)
        return df


def _summed(rows: int, trained: int, world: int) -> EpochRows:
    """This rank's counts summed over the data-parallel ranks (tensor-parallel peers read the same rows)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return EpochRows(rows, trained)
    t = torch.tensor([rows, trained], dtype=torch.int64)
    dist.all_reduce(t)
    peers = dist.get_world_size() // world
    return EpochRows(int(t[0]) // peers, int(t[1]) // peers)


def train_source(cfg: DataConfig, fs: FeatureSet, batch_size: int, seed: int, dataset_rows: int | None = None) -> BatchSource:
    """The rows an epoch trains on: held in memory, files read by this rank, or (data.stream.reader=ray_data,
    `dataset_rows` counted by the driver) this rank's shard of a Ray Data dataset."""
    if cfg.source == DataSource.criteo:
        if cfg.stream.reader == StreamReader.ray_data:
            from adsfm.training.ray_data import RayDataSource

            assert dataset_rows is not None, "the driver counts the dataset's rows"
            return RayDataSource(fs.spec, batch_size, dataset_rows)
        return CriteoSource(cfg, fs.spec, batch_size)
    return MemorySource(fs, batch_size, seed)


def write_synthetic_criteo(path: Path, rows: int, seed: int = 0, s: StreamConfig | None = None,
                           values_per_column: int = 1000, crosses: float = 0.0) -> Path:
    """A Criteo-format file (TSV, .gz or parquet by suffix) with Zipf-distributed hex ids, ~5% empty
    categoricals and ~10% empty integers, and labels that depend on both, for tests and benchmarks.

    Without `crosses` the label's logit is a sum of one effect per id (logistic regression is the true
    model); with it, pairs of columns (0-1, 2-3, 4-5) add an effect per pair of ids times `crosses`, the
    feature crosses that make deep models beat linear ones on the real logs."""
    s = s or StreamConfig()
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(12345)  # the same effects in every file
    effect = effects.normal(size=(s.num_sparse, values_per_column))
    ids = (rng.zipf(1.2, size=(rows, s.num_sparse)) - 1) % values_per_column
    ints = rng.poisson(3, size=(rows, s.num_dense)).astype(np.int64)
    logit = effect[np.arange(s.num_sparse), ids].sum(axis=1) / 3 + (0.3 * (ints[:, 0] - 3) if s.num_dense else 0)
    if crosses:
        for a in range(0, min(6, s.num_sparse - 1), 2):
            pair = effects.normal(size=values_per_column * values_per_column)
            logit = logit + crosses * pair[ids[:, a] * values_per_column + ids[:, a + 1]]
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    hexes = np.char.mod("%08x", (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32))
    cats = np.where(rng.random(ids.shape) < 0.05, "", hexes)
    int_s = np.where(rng.random(ints.shape) < 0.1, "", ints.astype(str))
    dense, sparse = columns(s)
    path = Path(path)
    if _kind(path) == "parquet":
        df = pd.DataFrame({"label": label})
        for j, c in enumerate(dense):
            df[c] = pd.array(ints[:, j], dtype="Int64")
            df.loc[int_s[:, j] == "", c] = pd.NA
        for j, c in enumerate(sparse):
            df[c] = cats[:, j]
        df.to_parquet(path, row_group_size=max(1, rows // 4))
        return path
    lines = "\n".join("\t".join(r) for r in np.concatenate([label.astype(str)[:, None], int_s, cats], axis=1)) + "\n"
    if _kind(path) == "gzip":
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path
