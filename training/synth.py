"""Criteo-1TB-shaped click logs at a chosen scale, written as files the real ingestion path reads
(`data=criteo`): parquet and/or gzip TSV shards plus a holdout shard.

The shape is the Criteo 1TB logs': a label, 13 integer columns (heavy-tailed counts, ~10% empty) and 26
categorical columns of 8-hex-digit ids (~5% empty), each column's ids Zipf-skewed over its own cardinality.
The cardinalities are the real logs' (`CRITEO_1TB_CARDINALITIES`, 3 to 40M) times one knob, `scale`, so
scale 1 gives tables of tens of millions of rows and scale 0.001 a laptop-sized set with the same skew.

Labels come from one effect per id plus a few pairwise crosses, all computed from hashes of the ids, so
no table of effects is held in memory at any scale: a file is written chunk by chunk, in bounded memory.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

CRITEO_1TB_CARDINALITIES = [
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208, 11938, 155, 4,
    976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
]
"""Distinct ids per categorical column of the Criteo 1TB click logs (as the MLPerf DLRM reference lists them)."""

NUM_DENSE, NUM_SPARSE = 13, 26
Format = Literal["parquet", "tsv.gz"]
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


@dataclass
class SynthSpec:
    """What `adsfm-data synth` writes."""

    rows: int
    """Training rows over all shards."""
    shards: int = 4
    holdout_rows: int = 100_000
    """Rows of the holdout shard (the 'last day')."""
    scale: float = 0.001
    """Cardinalities are the Criteo 1TB logs' times this; none below 16 or its real count if that is smaller."""
    zipf: float = 1.1
    """Zipf exponent of every column's id popularity (> 1; smaller: heavier tail)."""
    formats: list[str] = field(default_factory=lambda: ["parquet"])
    seed: int = 0
    chunk_rows: int = 262_144
    """Rows generated and written at once (memory is a few hundred bytes times this)."""

    def cardinalities(self) -> list[int]:
        return [max(min(c, 16), round(c * self.scale)) for c in CRITEO_1TB_CARDINALITIES]


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """A 64-bit hash of each value (splitmix-style), so ids and effects need no table."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(salt) * _M1) * _M2
        z ^= z >> np.uint64(31)
        z *= _M1
        z ^= z >> np.uint64(29)
    return z


def _uniform(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _chunk(spec: SynthSpec, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n rows: label, int_0.. (float with NaN where empty), cat_0.. (hex strings, "" where empty)."""
    cards = spec.cardinalities()
    out: dict[str, np.ndarray] = {}
    logit = np.full(n, -1.2)
    ints = np.floor(rng.lognormal(1.0, 1.3, size=(n, NUM_DENSE)))
    logit += 0.25 * (np.log1p(ints[:, 0]) - 1.3) - 0.15 * (np.log1p(ints[:, 1]) - 1.3)
    ids = np.empty((n, NUM_SPARSE), dtype=np.uint64)
    for t, card in enumerate(cards):
        rank = rng.zipf(spec.zipf, size=n).astype(np.uint64) - np.uint64(1)  # 0 is the most popular id
        ids[:, t] = _mix(rank, 1000 + t) % np.uint64(card)  # popularity rank → an id spread over the table
        logit += 0.9 * (_uniform(_mix(ids[:, t], 2000 + t)) - 0.5)  # one effect per id
    for a, b in ((0, 1), (2, 3), (9, 10)):  # crosses: an effect per pair of ids, what deep models find
        logit += 0.8 * (_uniform(_mix(ids[:, a] * np.uint64(1_000_003) + ids[:, b], 3000 + a)) - 0.5)
    out["label"] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    empty_int = rng.random(ints.shape) < 0.1
    for j in range(NUM_DENSE):
        out[f"int_{j}"] = np.where(empty_int[:, j], np.nan, ints[:, j])
    empty_cat = rng.random(ids.shape) < 0.05
    for t in range(NUM_SPARSE):
        hexes = np.char.mod("%08x", (_mix(ids[:, t], 4000 + t) & np.uint64(0xFFFFFFFF)))
        out[f"cat_{t}"] = np.where(empty_cat[:, t], "", hexes)
    return out


def _chunks(spec: SynthSpec, rows: int, seed: int, bar: tqdm) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    done = 0
    while done < rows:
        n = min(spec.chunk_rows, rows - done)
        yield _chunk(spec, rng, n)
        done += n
        bar.update(n)


def _arrow(cols: dict[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for k, v in cols.items():
        if k.startswith("int_"):
            arrays[k] = pa.array(np.nan_to_num(v).astype(np.int64), mask=np.isnan(v))
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


def _tsv(cols: dict[str, np.ndarray]) -> bytes:
    parts = [cols["label"].astype(str)]
    for j in range(NUM_DENSE):
        v = cols[f"int_{j}"]
        parts.append(np.where(np.isnan(v), "", np.nan_to_num(v).astype(np.int64).astype(str)))
    parts += [cols[f"cat_{t}"] for t in range(NUM_SPARSE)]
    lines = np.stack(parts, axis=1)
    return ("\n".join("\t".join(r) for r in lines.tolist()) + "\n").encode()


def write_shard(spec: SynthSpec, base: Path, rows: int, seed: int, bar: tqdm) -> list[Path]:
    """One shard, `rows` rows, in every requested format (the same rows in each); returns the paths. Each
    file is written as `<name>.partial` and appears under its name only once complete."""
    paths = {f: base.with_name(f"{base.name}.{f}") for f in spec.formats}
    partial = {f: p.with_name(p.name + ".partial") for f, p in paths.items()}
    with ExitStack() as stack:
        parquet: pq.ParquetWriter | None = None
        tsv = stack.enter_context(gzip.open(partial["tsv.gz"], "wb", compresslevel=3)) if "tsv.gz" in paths else None
        for cols in _chunks(spec, rows, seed, bar):
            if "parquet" in paths:
                table = _arrow(cols)
                if parquet is None:
                    parquet = stack.enter_context(pq.ParquetWriter(partial["parquet"], table.schema))
                parquet.write_table(table, row_group_size=65_536)
            if tsv is not None:
                tsv.write(_tsv(cols))
    for f, p in paths.items():
        partial[f].rename(p)
    return list(paths.values())


def synth(spec: SynthSpec, out: Path, progress: bool = True) -> dict[str, object]:
    """Write `spec.shards` training shards and one holdout shard under `out`, then `manifest.json` (the
    spec, cardinalities, files and the `data.stream` settings to train on them)."""
    bad = [f for f in spec.formats if f not in ("parquet", "tsv.gz")]
    if bad or not spec.formats:
        raise ValueError(f"formats {spec.formats}: choose from parquet, tsv.gz")
    if spec.rows < spec.shards or spec.shards < 1 or spec.holdout_rows < 1:
        raise ValueError(f"rows({spec.rows}) must be >= shards({spec.shards}) >= 1, holdout_rows({spec.holdout_rows}) >= 1")
    if not spec.scale > 0 or not spec.zipf > 1:
        raise ValueError(f"scale({spec.scale}) must be > 0 and zipf({spec.zipf}) > 1")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {f: [] for f in spec.formats}
    holdout: dict[str, list[str]] = {f: [] for f in spec.formats}
    bar = tqdm(total=spec.rows + spec.holdout_rows, desc="synth rows", unit="row", unit_scale=True, disable=not progress)
    per = [spec.rows // spec.shards + (i < spec.rows % spec.shards) for i in range(spec.shards)]
    for i, n in enumerate(per):
        for p in write_shard(spec, out / f"day_{i:02d}", n, spec.seed * 1000 + i, bar):
            files["parquet" if p.suffix == ".parquet" else "tsv.gz"].append(str(p))
    for p in write_shard(spec, out / "holdout", spec.holdout_rows, spec.seed * 1000 + 999, bar):
        holdout["parquet" if p.suffix == ".parquet" else "tsv.gz"].append(str(p))
    bar.close()
    cards = spec.cardinalities()
    manifest: dict[str, object] = {
        "spec": asdict(spec), "cardinalities": cards, "rows_per_shard": per, "files": files, "holdout": holdout,
        "embedding_rows": sum(cards),
        "stream": {"num_embeddings_per_feature": cards},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
