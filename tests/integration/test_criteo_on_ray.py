"""Criteo-format files streamed into a 2-worker Ray Train job, each worker reading its own half; the
checkpoint exports with parity, and serving's featurization of the raw hex values scores the same."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_criteo_files_train_on_two_workers_and_export(ray_cluster: None, tmp_path: Path) -> None:
    from adsfm.contract.config import compose
    from adsfm.export.bundle import export_bundle, load_run
    from adsfm.export.gate import holdout_aucs, holdout_columns
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.job import run_training
    from adsfm.training.stream import write_synthetic_criteo

    rows = [5000, 3000]
    train = [write_synthetic_criteo(tmp_path / f"day_{i}.tsv", n, seed=i) for i, n in enumerate(rows)]
    holdout = write_synthetic_criteo(tmp_path / "day_23.gz", 3000, seed=23)
    cfg = compose([
        "experiment=criteo_dlrm", f"run_root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.stream.paths=[{train[0]},{train[1]}]", f"data.stream.holdout_paths=[{holdout}]",
        "data.stream.hash_buckets=2000", "data.stream.chunk_bytes=65536", "train.batch_size=512",
        "train.progress=false", "train.checkpoint_every=5",
    ])
    result = run_training(cfg)

    # Each of the 2 ranks took 256 rows a step from its own half of the 8000 rows, and both stopped when
    # the shorter half ran out: no row was read twice, and at most a batch per rank was left over.
    steps = result.raw["steps"]
    assert steps * 512 <= sum(rows) and (steps + 2) * 512 > sum(rows), steps
    assert result.raw["epoch_rows"] == [{"epoch": 0, "rows": sum(rows), "trained": steps * 512, "not_trained": sum(rows) - steps * 512}]
    assert result.raw["world_size"] == 2
    # What the scale benchmark reads: each rank's peak memory, and a checkpoint holding at least the tables.
    assert len(result.raw["peak_rss_bytes"]) == 2 and min(result.raw["peak_rss_bytes"]) > 100e6
    assert result.raw["checkpoint_bytes"] >= 26 * 2000 * cfg.model.embedding_dim * 4 and result.raw["checkpoint_seconds"] > 0
    assert result.holdout["n"] == 3000 and result.holdout["auc"] > 0.6

    run_cfg, _ = load_run(result.run_dir)
    manifest = export_bundle(run_cfg, result.checkpoint, tmp_path / "bundle")
    assert manifest.parity is not None and manifest.parity.passed
    assert manifest.features.tables["cat_0"].hash_buckets == 2000
    # Serving hashes the raw hex strings (and empty fields) itself: the same AUC as training's evaluation.
    cols, labels = holdout_columns(manifest)
    assert any(v == "" for v in cols["cat_0"])
    assert holdout_aucs(DenseGraphEngine(tmp_path / "bundle"), cols, labels)[""] == pytest.approx(result.holdout["auc"], abs=1e-5)


def test_a_run_that_trains_no_step_fails_instead_of_reporting_success(ray_cluster: None, tmp_path: Path) -> None:
    """Files that hold less than one batch: no step runs, and the run fails, saying why, rather than
    reporting an untrained model as a success."""
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import compose
    from adsfm.contract.tracking import tracking_uri
    from adsfm.training.job import run_training
    from adsfm.training.stream import write_synthetic_criteo

    train = write_synthetic_criteo(tmp_path / "day_0.tsv", 300, seed=0)
    holdout = write_synthetic_criteo(tmp_path / "day_23.tsv", 300, seed=23)
    cfg = compose([
        "experiment=criteo_dlrm", f"run_root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "parallel=single",
        f"data.stream.paths=[{train}]", f"data.stream.holdout_paths=[{holdout}]", "data.stream.hash_buckets=200",
        "train.batch_size=512", "train.progress=false", "train.max_failures=0",
    ])
    with pytest.raises(Exception, match="no training step ran"):
        run_training(cfg)
    client = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri, cfg.run_root))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"params.run_dir = '{cfg.run_dir}'")
    assert [r.info.status for r in runs] == ["FAILED"]  # this run's MLflow record says so too
    assert not (Path(cfg.run_dir) / "train_result.json").exists()


@pytest.mark.parametrize(("workers", "rows"), [(2, [5000, 2000]), (4, [6000, 1200, 1100])])
def test_ray_data_trains_every_row_once_on_every_worker(ray_cluster: None, tmp_path: Path, workers: int, rows: list[int]) -> None:
    """`data.stream.reader=ray_data`: gzip TSV files of unequal size (one large, the others small) become one
    Ray Data dataset, featurized in map_batches and split between 2 or 4 Ray Train workers; at 4 there are
    more workers than files, and every worker still trains. The epoch's rows are the files' rows; the steps
    took at most all of them (a row read twice would push past) and left fewer than a batch per rank (rows
    lost to the split, or a worker left idle, would show); the model learns."""
    from adsfm.contract.config import compose
    from adsfm.training.job import run_training
    from adsfm.training.stream import write_synthetic_criteo

    train = [write_synthetic_criteo(tmp_path / f"day_{i}.gz", n, seed=i) for i, n in enumerate(rows)]
    holdout = write_synthetic_criteo(tmp_path / "day_23.gz", 3000, seed=23)
    cfg = compose([
        "experiment=criteo_dlrm", f"run_root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.stream.paths=[{','.join(map(str, train))}]", f"data.stream.holdout_paths=[{holdout}]",
        "data.stream.hash_buckets=2000", "data.stream.reader=ray_data", "train.batch_size=512", "train.progress=false",
        f"parallel.num_workers={workers}", f"parallel.cpu_per_worker={1 / workers}",  # a CPU left for Ray Data
    ])
    result = run_training(cfg)
    steps, total = result.raw["steps"], sum(rows)
    assert result.raw["epoch_rows"] == [{"epoch": 0, "rows": total, "trained": steps * 512, "not_trained": total - steps * 512}]
    # Every step takes 512 / workers rows on each worker; each worker leaves less than a local batch.
    assert total - workers * (512 // workers) < steps * 512 <= total, steps
    assert result.raw["world_size"] == workers and len(result.raw["peak_rss_bytes"]) == workers
    assert result.holdout["auc"] > 0.6
