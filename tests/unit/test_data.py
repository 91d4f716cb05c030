"""The MovieLens split and features: no leakage, and the generic tabular source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest


def test_split_has_no_leakage(features: Any) -> None:
    fs = features
    users, times = fs.users, fs.times
    assert len(fs.train_idx) + len(fs.holdout_idx) == 100_000
    assert 0.12 < len(fs.holdout_idx) / 100_000 < 0.21  # ~20% per user, ties at the boundary stay in training
    train_max: dict[str, int] = {}
    for i in fs.train_idx:
        train_max[users[i]] = max(train_max.get(users[i], -1), int(times[i]))
    late = [i for i in fs.holdout_idx if times[i] <= train_max.get(users[i], -1)]
    assert not late, f"{len(late)} holdout rows are not later than their user's training rows"
    assert len(set(users[fs.holdout_idx]) - set(train_max)) == 0  # every holdout user was seen in training


def test_history_uses_strictly_earlier_events(small_cfg: Any) -> None:
    from training.data import load_frame

    df, _ = load_frame(small_cfg.data)
    rng = np.random.default_rng(0)
    by_user = {u: g for u, g in df.groupby("user_id")}
    for row in rng.choice(len(df), size=300, replace=False):
        r = df.iloc[row]
        g = by_user[r.user_id]
        earlier = g[g.timestamp < r.timestamp].sort_values("timestamp", kind="stable")
        hist = [t for t in r.history.split("|") if t]
        assert set(hist) <= set(earlier.item_id), "history holds an item rated at or after this event"
        assert len(hist) == min(20, len(earlier))
        liked = [t for t in r.liked_history.split("|") if t]
        assert set(liked) <= set(earlier[earlier.rating >= 4].item_id)


def test_take_builds_the_rows_jagged_features(features: Any) -> None:
    fs = features
    idx = np.array([5, 17, 99_999, 0])
    b = fs.take(idx)
    kjt = b.sparse_features.to_dict()
    for name, (values, lengths) in fs.sparse.items():
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        want = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in idx])
        np.testing.assert_array_equal(kjt[name].values().numpy(), want)
        np.testing.assert_array_equal(kjt[name].lengths().numpy(), lengths[idx])
    np.testing.assert_array_equal(b.labels.numpy(), fs.labels[idx])


def test_tabular_csv_trains_without_code_change(tmp_path: Path) -> None:
    """conf/data/tabular.yaml on a CSV: hashing, a shared table, a multi-valued column, a history."""
    from training.config import compose
    from training.data import load_features, load_frame

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
    assert fs.spec["tables"]["user"]["hash_buckets"] == 100_000
    frame, _ = load_frame(cfg.data)  # FeatureSet row order
    # history items of a training row are earlier, hence training, rows: the vocabulary is the train ads
    assert fs.spec["tables"]["ad"]["rows"] == frame.ad.iloc[fs.train_idx].nunique() + 1
    assert set(fs.sparse) == {"user", "ad", "tags", "recent_ads"}
    want = [len([t for t in s.split(";") if t]) for s in frame.tags.astype(str)]
    np.testing.assert_array_equal(fs.sparse["tags"][1], want)
    b = fs.take(fs.train_idx[:64])
    assert b.dense_features.shape == (64, 1)


def test_bad_data_config_names_the_field(tmp_path: Path) -> None:
    from training.config import compose
    from training.data import load_features

    path = tmp_path / "x.csv"
    pd.DataFrame({"user": ["1"], "clicked": [1]}).to_csv(path, index=False)
    cfg = compose(["data=tabular", f"data.path={path}", f"data.cache_dir={tmp_path}", "data.history.length=0"])
    with pytest.raises(ValueError, match="column 'ad' not in the data"):
        load_features(cfg.data)
