"""The Criteo-format streaming reader: parsing and hashing against hand-checked lines, every line read
exactly once whatever the number of workers, and the same batches from TSV, gzip and parquet."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adsfm.contract.config import DataConfig, StreamConfig
from adsfm.training.stream import (
    CriteoSource,
    criteo_spec,
    rank_pieces,
    read_piece,
    read_rows,
    resolve,
    unread_share,
    write_synthetic_criteo,
)

# label, 2 integers, 3 categoricals; empty fields, a negative integer, a repeated id.
LINES = [
    "1\t5\t\t68fd1e64\t\t0a519c5c",
    "0\t-3\t12\t68fd1e64\tb5d6f0e2\t",
    "1\t0\t7\t8cf07265\t1f89b1c8\t0a519c5c",
]
SMALL = StreamConfig(num_dense=2, num_sparse=3, hash_buckets=1000, stats_rows=10, holdout_rows=10)


def _blake_row(value: str, buckets: int, missing_row: bool) -> int:
    """The hashing contract written out independently of adsfm.contract.features: an empty value is missing
    (row 1 when the table saw missing values in training, else row 0); a key lands after the reserved rows."""
    if value == "":
        return 1 if missing_row else 0
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets + 1 + missing_row


def _cfg(train: list[Path], holdout: list[Path], s: StreamConfig = SMALL) -> DataConfig:
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(DataConfig(source="criteo", stream=s))
    cfg.stream.paths = [str(p) for p in train]
    cfg.stream.holdout_paths = [str(p) for p in holdout]
    return cfg  # type: ignore[no-any-return]


def test_hand_checked_lines_parse_and_hash(tmp_path: Path) -> None:
    f = tmp_path / "day_0"
    f.write_text("\n".join(LINES) + "\n")
    cfg = _cfg([f], [f])
    spec = criteo_spec(cfg)

    # Dense: log1p of max(x, 0), statistics over the present values; a missing value is 0 after scaling.
    col0 = np.log1p([5.0, 0.0, 0.0])  # -3 is clipped to 0
    col1 = np.log1p([12.0, 7.0])  # the first line's value is missing
    assert spec.dense[0].mean == pytest.approx(col0.mean()) and spec.dense[0].std == pytest.approx(col0.std())
    assert spec.dense[1].mean == pytest.approx(col1.mean()) and spec.dense[1].std == pytest.approx(col1.std())
    assert spec.tables["cat_0"].model_dump() == {"rows": 1001, "pooling": "sum", "hash_buckets": 1000, "vocab": [], "missing": False,
                                              "edges": [], "managed": 0, "slot_keys": [], "eviction": "lru",
                                              "eviction_interval": 1}
    assert spec.tables["cat_1"].rows == 1002 and spec.tables["cat_1"].missing  # an empty value in the stats rows

    batch = next(CriteoSource(cfg, spec, batch_size=3).epoch(0, 0, 1, skip=0))
    np.testing.assert_array_equal(batch.labels.numpy(), [1, 0, 1])
    want_dense = np.array([
        [(np.log1p(5) - col0.mean()) / col0.std(), 0.0],
        [(0 - col0.mean()) / col0.std(), (np.log1p(12) - col1.mean()) / col1.std()],
        [(0 - col0.mean()) / col0.std(), (np.log1p(7) - col1.mean()) / col1.std()],
    ])
    np.testing.assert_allclose(batch.dense_features.numpy(), want_dense, rtol=1e-6, atol=1e-6)
    kjt = batch.sparse_features.to_dict()
    raw = [line.split("\t")[3:] for line in LINES]
    for j in range(3):
        missing = spec.tables[f"cat_{j}"].missing
        np.testing.assert_array_equal(kjt[f"cat_{j}"].values().numpy(), [_blake_row(r[j], 1000, missing) for r in raw])
        np.testing.assert_array_equal(kjt[f"cat_{j}"].lengths().numpy(), [1, 1, 1])
    assert kjt["cat_0"].values()[0] == kjt["cat_0"].values()[1]  # the same raw id, the same row


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_line_is_read_exactly_once(tmp_path: Path, world: int) -> None:
    files = [write_synthetic_criteo(tmp_path / f"day_{i}.tsv", 700 + 131 * i, seed=i, s=SMALL) for i in range(4)]
    whole = pd.concat([pd.read_csv(f, sep="\t", header=None, dtype=str, keep_default_na=False) for f in files], ignore_index=True)
    s = StreamConfig(num_dense=2, num_sparse=3, chunk_bytes=997)  # blocks end mid-line
    shares = []
    for rank in range(world):
        pieces = rank_pieces(files, rank, world)
        frames = [df for p in pieces for df in read_piece(p, s)]
        shares.append(pd.concat(frames, ignore_index=True) if frames else None)
    got = pd.concat([x for x in shares if x is not None], ignore_index=True)
    assert len(got) == len(whole)
    np.testing.assert_array_equal(got["label"].to_numpy(), whole[0].astype(int).to_numpy())
    np.testing.assert_array_equal(got["cat_2"].to_numpy(), whole[5].to_numpy())
    sizes = [len(x) if x is not None else 0 for x in shares]
    assert max(sizes) - min(sizes) <= 2 * len(files)  # equal byte shares: rows differ by line-length noise only


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_striped_gzip_reads_every_line_exactly_once_in_equal_shares(tmp_path: Path, world: int) -> None:
    rows = [2000, 131, 77, 5]  # one large file and small ones: whole files per rank would be far apart
    files = [write_synthetic_criteo(tmp_path / f"day_{i}.gz", n, seed=i, s=SMALL) for i, n in enumerate(rows)]
    s = StreamConfig(num_dense=2, num_sparse=3, chunk_bytes=997)  # blocks end mid-line
    shares = [pd.concat([df for p in rank_pieces(files, r, world) for df in read_piece(p, s)], ignore_index=True)
              for r in range(world)]
    assert max(map(len, shares)) - min(map(len, shares)) <= len(files)  # a line per file at most
    whole = read_rows(files, s, 10**9)
    assert len(whole) == sum(rows)
    for r, share in enumerate(shares):  # rank r holds lines r, r + world, ... of each file, in order
        want = pd.concat([whole.iloc[sum(rows[:i]) : sum(rows[: i + 1])].iloc[r::world] for i in range(len(rows))])
        np.testing.assert_array_equal(share["cat_1"].to_numpy(), want["cat_1"].to_numpy())
        np.testing.assert_array_equal(share["label"].to_numpy(), want["label"].to_numpy())


def test_workers_read_only_their_files(tmp_path: Path) -> None:
    files = [write_synthetic_criteo(tmp_path / f"day_{i}.tsv", 500, seed=i, s=SMALL) for i in range(4)]
    for f in files[1:]:  # equal sizes, so the byte halves fall on file boundaries
        f.write_bytes(files[0].read_bytes())
    assert {p.path for p in rank_pieces(files, 0, 2)} == set(files[:2])
    assert {p.path for p in rank_pieces(files, 1, 2)} == set(files[2:])
    gz = [write_synthetic_criteo(tmp_path / f"day_{i}.gz", 300 * (i + 1), seed=i, s=SMALL) for i in range(3)]
    owners = [{p.path for p in rank_pieces(gz, r, 2, "whole")} for r in range(2)]
    assert owners[0].isdisjoint(owners[1]) and owners[0] | owners[1] == set(gz)  # whole gzip files, never shared


def test_whole_gzip_files_too_few_fail_and_unequal_ones_are_measured(tmp_path: Path) -> None:
    gz = [write_synthetic_criteo(tmp_path / f"day_{i}.gz", 300 * (i + 1), seed=i, s=SMALL) for i in range(3)]
    with pytest.raises(ValueError, match=r"data.stream.paths: 3 gzip file\(s\) for 4 data-parallel ranks: .* 1 rank\(s\) would have nothing"):
        rank_pieces(gz, 0, 4, "whole")
    from adsfm.contract.config import compose
    from adsfm.training.job import validate

    cfg = compose(["experiment=criteo_dlrm", f"data.stream.paths=[{','.join(map(str, gz))}]", "data.stream.gzip_split=whole",
                   "data.stream.num_dense=2", "data.stream.num_sparse=3", "parallel.num_workers=4", "train.batch_size=512"])
    with pytest.raises(ValueError, match=r"1 rank\(s\) would have nothing to read"):
        validate(cfg)  # what adsfm-train runs before any worker starts
    sizes = [f.stat().st_size for f in gz]  # dealt: the largest to rank 0, the other two to rank 1
    assert unread_share(gz, 2, "whole") == pytest.approx(1 - 2 * min(sizes[2], sizes[0] + sizes[1]) / sum(sizes))
    assert unread_share(gz, 1, "whole") == 0.0
    assert unread_share(gz, 4, "striped") == 0.0 and len(rank_pieces(gz, 3, 4)) == 3  # striped: every rank reads every file
    tsv = [write_synthetic_criteo(tmp_path / f"day_{i}.tsv", 100 * (i + 1), seed=i, s=SMALL) for i in range(2)]
    assert unread_share(tsv, 4) == 0.0  # split by bytes: every rank gets an equal share


@pytest.mark.parametrize("suffix", ["gz", "parquet"])
def test_gzip_and_parquet_stream_the_same_batches_as_tsv(tmp_path: Path, suffix: str) -> None:
    tsv = write_synthetic_criteo(tmp_path / "d.tsv", 2000, seed=7)
    other = write_synthetic_criteo(tmp_path / f"d.{suffix}", 2000, seed=7)
    ref_cfg, cfg = _cfg([tsv], [tsv], StreamConfig()), _cfg([other], [other], StreamConfig())
    spec = criteo_spec(ref_cfg)
    assert criteo_spec(cfg) == spec
    a = list(CriteoSource(ref_cfg, spec, 256).local_batches(0, 1))
    b = list(CriteoSource(cfg, spec, 256).local_batches(0, 1))
    assert len(a) == len(b) == 2000 // 256
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.cats, y.cats)
        np.testing.assert_array_equal(x.dense, y.dense)
        np.testing.assert_array_equal(x.labels, y.labels)
    if suffix == "parquet":  # row shares, reading only the overlapping row groups
        s = StreamConfig()
        shares = [pd.concat([df for p in rank_pieces([other], r, 3) for df in read_piece(p, s)]) for r in range(3)]
        assert [len(x) for x in shares] == [666, 667, 667]
        whole = read_rows([tsv], s, 10**9)
        np.testing.assert_array_equal(pd.concat(shares)["cat_5"].to_numpy(), whole["cat_5"].to_numpy())


def test_bad_files_and_config_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.stream.paths is empty"):
        resolve([], "stream.paths")
    with pytest.raises(FileNotFoundError, match=r"data.stream.holdout_paths: .*matches no file"):
        resolve([str(tmp_path / "nope*.tsv")], "stream.holdout_paths")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match=r"bad.tsv: a line has 3 tab-separated fields, not 6"):
        read_rows([bad], SMALL, 10)
    bad.write_text("1\t2\t3\ta\tb\tc\td\n")
    with pytest.raises(ValueError, match=r"bad.tsv: a line has 7 tab-separated fields, not 6"):
        read_rows([bad], SMALL, 10)
    bad.write_text("yes\t2\t3\ta\tb\tc\n")
    with pytest.raises(ValueError, match=r"bad.tsv: not Criteo format"):
        read_rows([bad], SMALL, 10)
    cfg = _cfg([bad], [bad], StreamConfig(num_sparse=3, num_embeddings_per_feature=[10, 10]))
    with pytest.raises(ValueError, match=r"num_embeddings_per_feature has 2 entries != data.stream.num_sparse\(3\)"):
        criteo_spec(cfg)


def test_too_few_whole_gzip_files_fail_before_any_worker_starts(tmp_path: Path) -> None:
    from adsfm.contract.config import as_config, compose
    from adsfm.training.job import validate

    one = write_synthetic_criteo(tmp_path / "day_0.gz", 300, seed=0)
    cfg = as_config(compose(["experiment=criteo_dlrm", f"run_root={tmp_path}", f"data.stream.paths=[{one}]",
                             f"data.stream.holdout_paths=[{one}]", "data.stream.gzip_split=whole"]))  # tw2: two ranks
    with pytest.raises(ValueError, match=r"1 gzip file\(s\) for 2 data-parallel ranks"):
        validate(cfg)


def test_item_columns_come_with_each_candidate_and_score_as_whole_rows(tmp_path: Path) -> None:
    """`data.stream.item_columns`: those columns are the candidate's, the rest the request's. One user with
    20 candidates through the split path scores as the 20 whole rows (the user's values repeated) through
    batch scoring, and the candidates no longer all score alike."""
    import torch

    from adsfm.contract.config import ModelConfig, Precision
    from adsfm.contract.features import is_missing
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.models import build_model
    from adsfm.training.stream import criteo_features, criteo_holdout_frame

    train = write_synthetic_criteo(tmp_path / "day_0.tsv", 600, seed=0)
    hold = write_synthetic_criteo(tmp_path / "day_1.tsv", 100, seed=1)
    items = ["cat_3", "cat_9", "int_2"]
    cfg = _cfg([train], [hold], StreamConfig(hash_buckets=300, stats_rows=600, holdout_rows=100, item_columns=items))
    fs = criteo_features(cfg)
    assert {f.name for f in fs.spec.sparse if f.side == "item"} | {d.name for d in fs.spec.dense if d.side == "item"} == set(items)
    torch.manual_seed(0)
    model = build_model(fs.spec, ModelConfig(embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1]), device="cpu").eval()
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    write_dense_bundle(fs, tmp_path / "b", tables, model.dense, {n: Precision.fp32 for n, _ in tables}, 8, 17, {})
    engine = DenseGraphEngine(tmp_path / "b")

    frame = criteo_holdout_frame(cfg).iloc[:20]
    values = [{k: v for k, v in r.items() if k != "label" and not is_missing(v)} for r in frame.to_dict("records")]
    user = {k: v for k, v in values[0].items() if k not in items}
    candidates = [{k: v for k, v in r.items() if k in items} for r in values]
    split = engine.score(user, candidates)
    columns = {c: [user.get(c) if c not in items else r.get(c) for r in values] for c in frame.columns if c != "label"}
    np.testing.assert_allclose(split, engine.score_columns(columns), rtol=0, atol=1e-6)
    assert np.std(split) > 1e-4

    bad = _cfg([train], [hold], StreamConfig(hash_buckets=300, item_columns=["cat_3", "ad_id"]))
    with pytest.raises(ValueError, match=r"item_columns names \['ad_id'\], which are not columns"):
        criteo_spec(bad)
