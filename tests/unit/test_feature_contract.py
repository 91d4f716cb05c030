"""One feature contract on every path: the same raw rows give the same table rows and dense inputs, bit for
bit, in batch featurization, the streaming reader, export's featurization parity, the HTTP request path and
the MLflow pyfunc's rows. The rows hold missing values of every kind (None, NaN, pandas NA, ""), values
the vocabulary never saw, numbers given as strings and lists given as joined strings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from adsfm.contract.features import Featurizer, is_missing


def _json_value(v: Any) -> Any:
    """A frame cell as a JSON client sends it: missing is null, numpy scalars are numbers, lists stay lists."""
    if isinstance(v, list | tuple | np.ndarray):
        return [_json_value(x) for x in v]
    if is_missing(v) and not isinstance(v, str):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _rows_of(fs: Any, i: int) -> dict[str, np.ndarray]:
    return {f.name: fs.row_values(i, f.name) for f in fs.spec.sparse}


def test_every_path_featurizes_a_raw_row_identically(messy_bundle: dict[str, Any]) -> None:
    from adsfm.contract.request import request_rows
    from adsfm.export.parity import featurization_parity
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.serving.service import RankService

    frame, fs = messy_bundle["frame"], messy_bundle["features"]
    engine = DenseGraphEngine(messy_bundle["bundle"])
    spec = fs.spec
    n = len(frame)

    # export: raw holdout and training rows through the bundle's featurization, against training's
    assert featurization_parity(engine, fs, frame, np.arange(n), sample=n) is None

    # HTTP: each row as a request body (one user, its own item as the candidate), parsed by the request schema
    service = RankService(engine, "messy", "1", max_candidates=10, max_values=100)
    user_names = {f.name for f in [*spec.sparse, *spec.dense] if f.side == "user"}
    dense_names = {d.name for d in spec.dense}
    checked = 0
    for i in range(n):
        values = {f.name: frame[f.source].iloc[i] for f in [*spec.sparse, *spec.dense] if not getattr(f, "bucketizes", None)}
        body: dict[str, Any] = {"user": {}, "candidates": [{}]}
        for name, v in values.items():
            v = _json_value(v)
            if name in dense_names and isinstance(v, str):
                v = float(v) if v else None  # JSON numbers are numbers; the contract reads "2.5" as 2.5 too
            (body["user"] if name in user_names else body["candidates"][0])[name] = v
        if body["candidates"][0].get(spec.item_column) is None:
            continue  # a request names its candidate; training rows without an item id are still featurized above
        req = service.parse(json.dumps(body).encode())
        want = _rows_of(fs, i)
        for f in spec.sparse:
            where = req.user if f.side == "user" else req.candidates[0]
            got = engine.rows_of(f, where.get(f.field), f.name)  # a bucketized dense feature reads its dense field
            np.testing.assert_array_equal(got, want[f.name], err_msg=f"HTTP path, row {i}, {f.name}: {values[f.field]!r}")
        dense = np.zeros(len(spec.dense_inputs()), np.float32)
        for side, src in (("user", req.user), ("item", req.candidates[0])):
            cols, indicators = engine.featurizer.dense_layout(side)
            dense[cols + indicators] = engine.featurizer.dense_row(src, side, "")
        assert dense.tobytes() == fs.dense[i].tobytes(), f"HTTP path, row {i}: dense {dense} != {fs.dense[i]}"

        # the pyfunc: the same body as the frame rows MLflow hands it, one per candidate
        for span, user, items in engine.requests_of(request_rows(body)):
            assert span == slice(0, 1)
            for f in spec.sparse:
                src = user if f.side == "user" else items[0]
                np.testing.assert_array_equal(engine.rows_of(f, src.get(f.field), f.name), want[f.name])
        checked += 1
    assert checked > 0.9 * n


def test_a_candidate_takes_the_item_store_for_what_it_does_not_send(messy_bundle: dict[str, Any]) -> None:
    from adsfm.serving.engine import DenseGraphEngine

    engine = DenseGraphEngine(messy_bundle["bundle"])
    item, stored = next((k, v) for k, v in engine.item_store.items() if v.get("tags"))
    tags = engine.manifest.features.sparse_feature("tags")
    want = engine.rows_of(tags, stored["tags"], "tags")
    for candidate in ({"ad": item}, {"ad": item, "tags": None}, {"ad": int(item), "tags": ""}):
        np.testing.assert_array_equal(engine.rows_of(tags, engine.item_features(candidate).get("tags"), "tags"), want)
    np.testing.assert_array_equal(engine.rows_of(tags, engine.item_features({"ad": item, "tags": ["zz"]})["tags"], "tags"),
                                  engine.rows_of(tags, ["zz"], "tags"))
    assert engine.item_features({"ad": "no-such-ad", "tags": None}) == {"ad": "no-such-ad", "tags": None}


def test_item_store_ids_score_as_the_items_sent_in_full_without_a_float_store(messy_bundle: dict[str, Any]) -> None:
    """Candidates named by id alone gather their rows from the store's index and dequantize them per request:
    the same scores as the same items sent with every field (single- and multi-valued features, empty bags,
    mixed with an item the store lacks), and the index holds row numbers, not float embeddings."""
    from adsfm.serving.engine import DenseGraphEngine

    engine = DenseGraphEngine(messy_bundle["bundle"])
    store = engine.item_store
    ids = list(store)
    many = [k for k in ids if isinstance(store[k].get("tags"), list) and len(store[k]["tags"]) > 1][:3]
    empty = [k for k in ids if not store[k].get("tags")][:2]
    picked = [*many, *empty, *ids[:20]][::-1]
    assert many and empty
    user = {"user": "u1", "country": "de"}
    by_id = engine.score(user, [{"ad": k} for k in picked])
    in_full = engine.score(user, [{"ad": k, **store[k]} for k in picked])
    np.testing.assert_allclose(by_id, in_full, rtol=0, atol=1e-6)
    mixed = engine.score(user, [{"ad": picked[0]}, {"ad": "no-such-ad", "tags": ["zz"]}, {"ad": picked[1]}])
    np.testing.assert_allclose(mixed[[0, 2]], by_id[:2], rtol=0, atol=1e-6)
    assert not any(a.dtype.kind == "f" for bag in engine._item_bags for a in bag)
    index_bytes = sum(a.nbytes for bag in engine._item_bags for a in bag)
    assert index_bytes < len(ids) * len(engine._item_bags) * engine.manifest.embedding_dim * 4


def test_missing_and_unseen_values_take_the_documented_rows(messy_bundle: dict[str, Any]) -> None:
    fs = messy_bundle["features"]
    spec = fs.spec
    fz = Featurizer(spec)
    country = spec.sparse_feature("country")
    table = spec.tables["country"]
    assert table.missing and table.missing_row == 1  # the training rows had missing countries
    for missing in (None, math.nan, pd.NA, "", [], [None]):
        assert fz.rows(country, missing, "country").tolist() == [1]
    assert fz.rows(country, "never-seen", "country").tolist() == [0]
    assert fz.rows(country, 7, "country").tolist() == fz.rows(country, "7", "country").tolist() == fz.rows(country, 7.0, "country").tolist()
    assert fz.rows(country, "7", "country")[0] >= table.first
    tags = spec.sparse_feature("tags")
    assert fz.rows(tags, "a;;b", "tags").tolist() == fz.rows(tags, ["a", "", None, "b"], "tags").tolist() == fz.rows(tags, ["a", "b"], "tags").tolist()
    for missing in (None, math.nan, "", []):
        assert fz.rows(tags, missing, "tags").size == 0  # an empty bag pools to zeros
    bid = spec.dense[[d.name for d in spec.dense].index("bid")]
    x = fz.numbers([None, math.nan, "", "2.5", 2.5, True, -3], "bid")
    np.testing.assert_array_equal(np.isnan(x), [1, 1, 1, 0, 0, 0, 0])
    z = Featurizer.standardise(bid, x)
    assert z[:3].tolist() == [0.0, 0.0, 0.0]  # missing is the training mean
    assert z[3] == z[4] and z[6] == Featurizer.standardise(bid, np.array([0.0]))[0]  # log1p counts negatives as 0
    assert spec.dense_inputs() == ["bid", "age", "bid_missing"]


@pytest.mark.parametrize("bad,field,message", [
    ({"country": {"a": 1}}, "country", "expected a string or a number"),
    ({"bid": "cheap"}, "bid", "expected a number"),
    ({"bid": math.inf}, "bid", "finite"),
    ({"country": ["fr", "de"]}, "country", "takes one value"),
])
def test_a_value_of_the_wrong_type_names_the_field(messy_bundle: dict[str, Any], bad: dict[str, Any], field: str, message: str) -> None:
    from adsfm.contract.features import FeatureError
    from adsfm.serving.engine import DenseGraphEngine

    engine = DenseGraphEngine(messy_bundle["bundle"])
    with pytest.raises(FeatureError, match=message) as e:
        engine.score({"user": "u1", **{k: v for k, v in bad.items() if k != "bid"}}, [{"ad": 3, **{k: v for k, v in bad.items() if k == "bid"}}])
    assert e.value.field.endswith(field)


def test_the_streaming_reader_featurizes_files_like_the_frame(tmp_path: Path) -> None:
    """Criteo-format rows with missing and unseen values, written as TSV, gzip and parquet: the reader's
    chunks hold the rows and dense inputs the in-memory frame gets."""
    from adsfm.contract.config import StreamConfig
    from adsfm.training.data import featurize_frame, learn_spec
    from adsfm.training.stream import criteo_data_config, featurize_rows, rank_pieces, read_piece

    s = StreamConfig(num_dense=2, num_sparse=3, hash_buckets=50)
    rng = np.random.default_rng(3)
    n = 300
    frame = pd.DataFrame({
        "label": rng.integers(0, 2, n),
        "int_0": [None if i % 7 == 0 else float(v) for i, v in enumerate(rng.poisson(3, n))],
        "int_1": [None if i % 5 == 0 else float(v) for i, v in enumerate(rng.integers(-2, 9, n))],
        "cat_0": [None if i % 6 == 0 else f"{v:08x}" for i, v in enumerate(rng.integers(0, 40, n))],
        "cat_1": [None if i % 9 == 0 else str(v) for i, v in enumerate(rng.integers(0, 12, n))],  # numbers as text
        "cat_2": [f"{v:08x}" for v in rng.integers(0, 300, n)],  # mostly unseen in the stats rows
    })
    from adsfm.contract.config import DataConfig, typed

    declared = criteo_data_config(typed(DataConfig, {"source": "criteo", "stream": s}))
    spec = learn_spec(frame.iloc[:100], declared, np.arange(100))
    want_dense, want_sparse = featurize_frame(frame, spec)
    for suffix in ("tsv", "gz", "parquet"):
        path = tmp_path / f"day.{suffix}"
        if suffix == "parquet":
            frame.astype({"int_0": "Float64", "int_1": "Float64"}).to_parquet(path, row_group_size=70)
        else:
            text = frame.fillna("").astype({"int_0": object, "int_1": object})
            for c in ("int_0", "int_1"):
                text[c] = [("" if v == "" else str(int(v))) for v in text[c]]
            text.to_csv(path, sep="\t", header=False, index=False, compression="gzip" if suffix == "gz" else None)
        chunks = [featurize_rows(df, spec) for p in rank_pieces([path], 0, 1) for df in read_piece(p, s)]
        dense = np.concatenate([c.dense for c in chunks])
        cats = np.concatenate([c.cats for c in chunks])
        assert dense.tobytes() == want_dense.tobytes(), suffix
        for j, f in enumerate(spec.sparse):
            np.testing.assert_array_equal(cats[:, j], want_sparse[f.name][0], err_msg=f"{suffix} {f.name}")


def test_bucket_edges_come_from_training_rows_and_bin_every_path_alike(messy: Any, messy_cfg: Any,
                                                                       messy_features: Any) -> None:
    """`buckets: N` on a dense feature: quantile edges of the training rows only (the holdout can change
    without moving them), a value's row is first + #(edges <= value), a missing value the missing row."""
    from adsfm.training.data import add_history, learn_spec, split_by_user_time

    frame, fs = messy_features
    fz = Featurizer(fs.spec)
    t = fs.spec.tables["age_bucket"]
    x = fz.numbers(frame["age"].iloc[fs.train_idx], "age")
    present = x[~np.isnan(x)]
    assert t.edges == np.unique(np.quantile(present, [0.2, 0.4, 0.6, 0.8])).tolist() and len(t.edges) >= 2
    assert t.missing == bool(np.isnan(x).any()) and t.rows == t.first + len(t.edges) + 1

    moved = add_history(messy.copy(), messy_cfg.data)
    train_idx, holdout_idx = split_by_user_time(moved, messy_cfg.data)
    moved.loc[moved.index[holdout_idx], "age"] = 1e9
    assert learn_spec(moved, messy_cfg.data, train_idx).tables["age_bucket"].edges == t.edges

    f = fs.spec.sparse_feature("age_bucket")
    assert f.field == "age" and "age_bucket" not in fs.spec.request_fields()
    for v in [-1.0, t.edges[0], t.edges[0] + 1e-9, t.edges[-1], 1e12, "30", None, float("nan"), ""]:
        num = np.nan if is_missing(v) else float(v)
        want = t.missing_row if np.isnan(num) else t.first + int(sum(e <= num for e in t.edges))
        assert fz.rows(f, v, "age")[0] == want, v
        assert fz.sparse_column(f, [v, v])[0].tolist() == [want, want], v
    with pytest.raises(ValueError, match="age"):
        fz.rows(f, "old", "age")
    rows = fs.sparse["age_bucket"][0]
    assert rows.min() >= 1 and rows.max() < t.rows and len(np.unique(rows)) > 2
