"""Data on the messy synthetic table: the per-user time split without leakage, histories of strictly earlier
events, jagged batches; the same table read back from CSV and from parquet (object, pandas string and
arrow string columns) featurizes to the same rows; bad labels, times and configs are errors that name the
column and the count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.messy import DATA, file_columns, messy_frame


def test_split_has_no_leakage(messy_features: Any) -> None:
    _, fs = messy_features
    users, times = fs.users, fs.times
    assert len(fs.train_idx) + len(fs.holdout_idx) == len(fs.labels)
    train_max: dict[str, int] = {}
    for i in fs.train_idx:
        train_max[users[i]] = max(train_max.get(users[i], -1), int(times[i]))
    late = [i for i in fs.holdout_idx if times[i] <= train_max.get(users[i], -1)]
    assert not late, f"{len(late)} holdout rows are not later than their user's training rows"
    assert set(users[fs.holdout_idx]) <= set(train_max)  # every holdout user was seen in training
    missing_user = [i for i, u in enumerate(users) if u.startswith("\x00row")]
    assert missing_user and not set(missing_user) & set(fs.holdout_idx)  # a missing user is a user of one row


def test_history_uses_strictly_earlier_events(messy_features: Any) -> None:
    from adsfm.contract.features import is_missing

    frame, _ = messy_features
    for _, r in frame.iterrows():
        if is_missing(r.user):
            assert r.recent_ads == []
            continue
        earlier = frame[(frame.user == r.user) & (frame.ts < r.ts)]
        ads = [str(a) for a in earlier.ad if not is_missing(a)]
        assert r.recent_ads == ads[::-1][:5], "the latest 5 earlier items with an id, most recent first"


def test_take_builds_the_rows_jagged_features(messy_features: Any) -> None:
    _, fs = messy_features
    idx = np.array([5, 17, len(fs.labels) - 1, 0])
    b = fs.take(idx)
    kjt = b.sparse_features.to_dict()
    for name, (values, lengths) in fs.sparse.items():
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        want = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in idx])
        np.testing.assert_array_equal(kjt[name].values().numpy(), want)
        np.testing.assert_array_equal(kjt[name].lengths().numpy(), lengths[idx])
    np.testing.assert_array_equal(b.labels.numpy(), fs.labels[idx])


@pytest.mark.parametrize("form", ["csv", "parquet-object", "parquet-string", "parquet-arrow"])
def test_missing_values_read_from_csv_and_parquet_featurize_like_the_frame(
        messy: Any, messy_features: Any, messy_cfg: Any, tmp_path: Path, form: str) -> None:
    from adsfm.contract.config import DataConfig, typed
    from adsfm.training.data import load_features

    _, want = messy_features
    table = file_columns(messy)
    path = tmp_path / ("events.csv" if form == "csv" else "events.parquet")
    if form == "csv":
        table.to_csv(path, index=False)
    else:
        text = {"object": object, "string": pd.StringDtype("python"), "arrow": pd.StringDtype("pyarrow")}[form.split("-")[1]]
        for c in ("user", "country", "tags", "clicked"):
            table[c] = table[c].astype(object).where(table[c].notna() & (table[c] != ""), None)
            table[c] = table[c].astype(text)
        table["ad"] = table["ad"].astype("Int64")
        table.to_parquet(path)
    cfg = typed(DataConfig, {**DATA, "path": str(path), "cache_dir": str(tmp_path / "cache")})
    got = load_features(cfg)
    np.testing.assert_array_equal(got.train_idx, want.train_idx)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.dense.tobytes() == want.dense.tobytes()
    for name in want.sparse:
        for a, b in zip(got.sparse[name], want.sparse[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{form}: {name}")
    assert got.spec.tables == want.spec.tables


def test_tabular_csv_trains_without_code_change(tmp_path: Path) -> None:
    """conf/data/tabular.yaml on a CSV: hashing, a shared table, a multi-valued column, a history."""
    from adsfm.contract.config import compose
    from adsfm.training.data import load_features, load_frame

    rng = np.random.default_rng(1)
    n = 600
    df = pd.DataFrame(
        {
            "user": rng.integers(0, 30, n).astype(str),
            "ad": rng.integers(0, 50, n).astype(str),
            "tags": [";".join(rng.choice(list("abcdef"), rng.integers(0, 3), replace=False)) for _ in range(n)],
            "bid": rng.gamma(2.0, 1.0, n),
            "ts": rng.integers(0, 10_000, n),
            "clicked": rng.integers(0, 2, n),
        }
    )
    path = tmp_path / "events.csv"
    df.to_csv(path, index=False)
    cfg = compose(["data=tabular", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}"])
    fs = load_features(cfg.data)
    assert fs.spec.tables["user"].hash_buckets == 100_000
    frame, _ = load_frame(cfg.data)  # FeatureSet row order
    # history items of a training row are earlier, hence training, rows: the vocabulary is the train ads
    assert fs.spec.tables["ad"].rows == frame.ad.iloc[fs.train_idx].nunique() + 1
    assert set(fs.sparse) == {"user", "ad", "tags", "recent_ads"}
    want = [len([t for t in s.split(";") if t]) if isinstance(s, str) else 0 for s in frame.tags]
    np.testing.assert_array_equal(fs.sparse["tags"][1], want)
    b = fs.take(fs.train_idx[:64])
    assert b.dense_features.shape == (64, 1)


@pytest.mark.parametrize("change,message", [
    ({"clicked": [None, "yes"]}, r"data.label='clicked': 1 of \d+ rows have no label"),
    ({"clicked": ["maybe", "yes"]}, None),  # with label_positive: anything else is a negative
    ({"ts": [None, 5]}, r"data.time_column='ts': 1 of \d+ rows have no time"),
    ({"ts": ["yesterday", 5]}, r"data.time_column='ts': 1 values are neither seconds nor dates, e.g. \['yesterday'\]"),
    ({"bid": ["cheap", 1.0]}, r"data.dense\[bid\].*expected a number, got 'cheap'.*declare it under data.sparse"),
])
def test_bad_values_are_errors_that_name_the_column(messy_cfg: Any, change: dict[str, list[Any]], message: str | None) -> None:
    from adsfm.training.data import add_history, featurize

    frame = messy_frame(60)
    for col, values in change.items():
        frame[col] = frame[col].astype(object)
        frame.loc[: len(values) - 1, col] = pd.Series(values, dtype=object).values
    if message is None:
        featurize(add_history(frame, messy_cfg.data), messy_cfg.data)
        return
    with pytest.raises(ValueError, match=message):
        featurize(add_history(frame, messy_cfg.data), messy_cfg.data)


def test_labels_as_classes_need_the_positive_class(messy_cfg: Any) -> None:
    from adsfm.contract.config import DataConfig, typed
    from adsfm.contract.features import labels, timestamps
    from adsfm.training.data import featurize

    frame = messy_frame(60)
    cfg = typed(DataConfig, {**DATA, "label_positive": None, "history": {"length": 0},
                             "sparse": [f for f in DATA["sparse"] if f["name"] != "recent_ads"]})
    with pytest.raises(ValueError, match=r"data.label='clicked' holds 60 values that are not numbers, e.g. \['no', 'yes'\]: set data.label_positive"):
        featurize(frame, cfg)
    np.testing.assert_array_equal(labels(pd.Series(["1", 0, 1.0, True]), "y"), [1, 0, 1, 1])
    np.testing.assert_array_equal(labels(pd.Series([3.0, 4.5]), "rating", threshold=4), [0, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*data.label_threshold"):
        labels(pd.Series([3.0, 4.5]), "rating")
    np.testing.assert_array_equal(timestamps(pd.Series(["2024-01-01", "2024-01-01T00:00:10Z"]), "t"), [1704067200, 1704067210])
    np.testing.assert_array_equal(timestamps(pd.Series(pd.to_datetime(["2024-01-01"])), "t"), [1704067200])


def test_bad_data_config_names_the_field(tmp_path: Path) -> None:
    from adsfm.contract.config import compose
    from adsfm.training.data import load_features

    path = tmp_path / "x.csv"
    pd.DataFrame({"user": ["1"], "ts": [1], "clicked": [1]}).to_csv(path, index=False)
    cfg = compose(["data=tabular", f"data.path={path}", f"data.cache_dir={tmp_path}", "data.history.length=0"])
    with pytest.raises(ValueError, match="column 'ad' not in the data"):
        load_features(cfg.data)
