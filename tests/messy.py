"""A small events table with what real files have: missing values of every kind in every column kind,
numbers given as strings, lists given as joined strings, string labels. The unit tests featurize it through
every path; the integration tests write it as CSV and parquet, train on it and serve it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# The features the data config declares for it (conf/data/tabular.yaml's column names, and more).
DATA = {
    "source": "tabular",
    "label": "clicked",
    "label_positive": "yes",
    "user_column": "user",
    "item_column": "ad",
    "time_column": "ts",
    "holdout_fraction": 0.25,
    "history": {"length": 5, "name": "recent_ads"},
    "dense": [
        {"name": "bid", "side": "item", "log1p": True, "missing_indicator": True, "buckets": 4},
        {"name": "age", "side": "user", "buckets": 5},
    ],
    "sparse": [
        {"name": "user", "hash_buckets": 1000, "side": "user"},
        {"name": "country", "side": "user"},
        {"name": "ad", "table": "ad", "side": "item"},
        {"name": "tags", "multi": True, "sep": ";", "side": "item"},
        {"name": "recent_ads", "table": "ad", "multi": True, "side": "user", "pooling": "mean"},
    ],
}
MISSING: list[Any] = [None, np.nan, pd.NA, ""]


def messy_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """`n` events (object columns, as a program would hand them over) whose label depends on the features."""
    rng = np.random.default_rng(seed)
    user = [f"u{k}" for k in rng.integers(0, 40, n)]
    ad = rng.integers(0, 60, n).tolist()
    country = rng.choice(["fr", "de", "us", "7"], n).astype(object)
    tags: list[Any] = [";".join(rng.choice(list("abcde"), rng.integers(0, 4))) for _ in range(n)]
    bid = rng.gamma(2.0, 1.0, n).astype(object)
    age = rng.integers(18, 70, n).astype(object)
    score = (np.array(ad) % 7) / 7 + (country == "fr") - 0.5 + rng.normal(0, 0.5, n)
    clicked = np.where(score > 0.2, "yes", "no").astype(object)
    for i in range(n):  # every kind of missing value, spread over the rows
        kind = MISSING[i % len(MISSING)]
        if i % 11 == 3:
            user[i] = kind  # type: ignore[call-overload]
        if i % 13 == 5:
            ad[i] = kind
        if i % 7 == 1:
            country[i] = kind
        if i % 9 == 2:
            tags[i] = kind
        if i % 10 == 4:
            bid[i] = kind
        if i % 17 == 6:
            age[i] = kind
    for i in range(0, n, 23):  # numbers given as strings, lists given as lists
        age[i] = str(age[i]) if not _missing(age[i]) else age[i]
        bid[i] = f"{float(bid[i]):.3f}" if not _missing(bid[i]) else bid[i]
        tags[i] = tags[i].split(";") + [""] if isinstance(tags[i], str) and tags[i] else tags[i]
    ts = 1_600_000_000 + np.sort(rng.integers(0, 10_000_000, n))
    return pd.DataFrame({"user": pd.Series(user, dtype=object), "ad": pd.Series(ad, dtype=object),
                         "country": pd.Series(country, dtype=object), "tags": pd.Series(tags, dtype=object),
                         "bid": pd.Series(bid, dtype=object), "age": pd.Series(age, dtype=object),
                         "ts": ts, "clicked": pd.Series(clicked, dtype=object)})


def file_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """What a file can hold: lists joined by the feature's separator, numbers as numbers."""
    out = frame.copy()
    out["tags"] = [";".join(v) if isinstance(v, list) else v for v in frame.tags]
    for c in ("bid", "age"):
        out[c] = pd.to_numeric(frame[c].replace("", np.nan), errors="coerce")
    out["ad"] = pd.Series([None if (v is None or v is pd.NA or v == "" or v != v) else v for v in frame.ad], dtype=object)
    return out


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or v == "" or (isinstance(v, float) and v != v)
