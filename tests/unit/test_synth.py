"""`adsfm-data synth`: Criteo-1TB-shaped shards at a chosen scale. The parquet and gzip TSV forms hold the
same rows, and the streamed Criteo reader (the training path) reads both the same; shards and the holdout
have the rows asked for; every column keeps to its cardinality (the real logs' times the scale) with
Zipf-skewed ids and the logs' share of empty fields; labels depend on the ids (so there is something to
learn); bad arguments fail naming the argument."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any]:
    from adsfm.training.synth import SynthSpec, synth

    out = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(rows=6001, shards=3, holdout_rows=700, scale=0.0005, formats=["parquet", "tsv.gz"], chunk_rows=1000)
    return out, synth(spec, out, progress=False), spec


def _read(paths: list[str]) -> pd.DataFrame:
    from adsfm.contract.config import StreamConfig
    from adsfm.training.stream import read_rows

    return read_rows([Path(p) for p in paths], StreamConfig(), limit=10**9)


def test_both_formats_hold_the_same_rows_and_the_reader_reads_them(written: tuple[Path, dict[str, Any], Any]) -> None:
    out, m, spec = written
    assert [Path(p).name for p in m["files"]["parquet"]] == ["day_00.parquet", "day_01.parquet", "day_02.parquet"]
    assert m["rows_per_shard"] == [2001, 2000, 2000]
    assert [len(pd.read_parquet(p)) for p in m["files"]["parquet"]] == m["rows_per_shard"]
    pq_rows, tsv_rows = _read(m["files"]["parquet"]), _read(m["files"]["tsv.gz"])
    assert len(pq_rows) == len(tsv_rows) == spec.rows
    pd.testing.assert_frame_equal(pq_rows.reset_index(drop=True), tsv_rows.reset_index(drop=True), check_dtype=False)
    assert len(_read(m["holdout"]["parquet"])) == 700
    assert json.loads((out / "manifest.json").read_text())["cardinalities"] == m["cardinalities"]
    assert not list(out.glob("*.partial"))


def test_columns_keep_to_their_cardinalities_with_skew_and_gaps(written: tuple[Path, dict[str, Any], Any]) -> None:
    from adsfm.training.synth import CRITEO_1TB_CARDINALITIES

    _, m, spec = written
    cards = m["cardinalities"]
    assert cards == [max(min(c, 16), round(c * 0.0005)) for c in CRITEO_1TB_CARDINALITIES]
    assert max(cards) == round(39979771 * 0.0005) and cards[5] == 3  # tens of thousands down to a few
    df = pd.concat([pd.read_parquet(p) for p in m["files"]["parquet"]])
    assert list(df.columns) == ["label", *[f"int_{j}" for j in range(13)], *[f"cat_{t}" for t in range(26)]]
    for t, card in enumerate(cards):
        ids = df[f"cat_{t}"][df[f"cat_{t}"] != ""]
        assert ids.nunique() <= card and ids.str.fullmatch(r"[0-9a-f]{8}").all()
    top = df["cat_0"].value_counts(normalize=True)  # a 20k-id column: Zipf puts a large share on its top id
    assert top.iloc[0] > 0.05 and top.iloc[0] > 50 * top.iloc[len(top) // 2]
    empty_cat = (df[[f"cat_{t}" for t in range(26)]] == "").to_numpy().mean()
    empty_int = df[[f"int_{j}" for j in range(13)]].isna().to_numpy().mean()
    assert 0.04 < empty_cat < 0.06 and 0.08 < empty_int < 0.12
    assert 0.1 < df["label"].mean() < 0.6


def test_labels_depend_on_the_ids(written: tuple[Path, dict[str, Any], Any]) -> None:
    _, m, _ = written
    df = pd.concat([pd.read_parquet(p) for p in m["files"]["parquet"]])
    small = ["cat_5", "cat_12", "cat_16", "cat_18"]  # columns of 3 to 14 ids, each id seen often

    def spread(labels: np.ndarray) -> float:
        return max(float(np.ptp(pd.Series(labels).groupby(df[c].to_numpy()).mean())) for c in small)

    shuffled = np.random.default_rng(0).permutation(df["label"].to_numpy())  # the control: no dependence
    assert spread(df["label"].to_numpy()) > 0.1 > spread(shuffled)


def test_the_command_writes_and_prints_how_to_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adsfm.launch.data import main

    main(["synth", "--out", str(tmp_path), "--rows", "500", "--shards", "2", "--holdout-rows", "100", "--no-progress"])
    said = capsys.readouterr().out
    assert "adsfm-train experiment=criteo_dlrm" in said and str(tmp_path / "day_01.parquet") in said
    assert "num_embeddings_per_feature=[" in said
    with pytest.raises(SystemExit, match="formats"):
        main(["synth", "--out", str(tmp_path / "x"), "--rows", "10", "--formats", "csv"])
    with pytest.raises(SystemExit, match="scale"):
        main(["synth", "--out", str(tmp_path / "x"), "--rows", "10", "--scale", "0"])
    with pytest.raises(SystemExit, match=r"rows\(1\) must be >= shards\(4\)"):
        main(["synth", "--out", str(tmp_path / "x"), "--rows", "1"])
