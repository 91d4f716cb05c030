"""Driver side of a training job: validate, prepare data, start Ray Train, record the run in MLflow."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from adsfm.contract.cluster import init_ray_for
from adsfm.contract.config import (
    AdsfmConfig,
    Arch,
    DataSource,
    StreamReader,
    TrainPipeline,
    as_config,
    to_plain,
)
from adsfm.contract.features import FeatureSpec
from adsfm.contract.tasks import check_task_names
from adsfm.contract.tracking import ensure_experiment, tracking_uri
from adsfm.parallel.config import dense_degrees, validate_parallel
from adsfm.parallel.dense_plan import SparseDenseModel
from adsfm.parallel.plan import table_names
from adsfm.training.baseline import compare, starts_from_baseline, train_baseline
from adsfm.training.data import check_collisions, data_fingerprint, load_features
from adsfm.training.models import POOLED_ARCHS, build_model
from adsfm.training.models.pooled import table_dim
from adsfm.training.sweep import PARENT_ENV


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    checkpoint: Path
    holdout: dict[str, float]
    tracking_uri: str
    raw: dict[str, Any]


def validate(cfg: AdsfmConfig) -> FeatureSpec:
    """Everything that can be checked before a worker starts; returns the data spec it needed."""
    p, t = cfg.parallel, cfg.train
    dp = dense_degrees(p, p.num_workers)[0]  # also checks dp * tp == num_workers
    if t.batch_size % dp:
        what = "parallel.num_workers" if dp == p.num_workers else "parallel.dp"
        raise ValueError(f"train.batch_size({t.batch_size}) % {what}({dp}) = {t.batch_size % dp} != 0: use a multiple of {dp}")
    if t.eval_batch_size <= 0 or t.epochs <= 0:
        raise ValueError(f"train.epochs({t.epochs}) and train.eval_batch_size({t.eval_batch_size}) must be > 0")
    if t.early_stopping:
        if cfg.data.source == DataSource.criteo:
            raise ValueError("train.early_stopping=true carves its validation rows from rows in memory; "
                             "data.source=criteo streams files: turn it off or use an in-memory source")
        if not 0 < t.validation_fraction < 1 or t.patience < 1:
            raise ValueError(f"train.validation_fraction({t.validation_fraction}) must be in (0, 1) and "
                             f"train.patience({t.patience}) >= 1")
    if t.pipeline == TrainPipeline.sparse_dist:
        tp = dense_degrees(p, p.num_workers)[1]
        if cfg.model.arch not in POOLED_ARCHS or p.data_parallel != "ddp" or tp > 1 or p.sparse_group:
            raise ValueError(
                f"train.pipeline=sparse_dist pipelines pooled models (dlrm, dcnv2, logreg) on ddp layouts; got "
                f"model.arch={cfg.model.arch}, parallel.data_parallel={p.data_parallel}, tp={tp}, sparse_group={p.sparse_group}: "
                "use train.pipeline=plain")
    if cfg.model.arch == Arch.hstu and any(d.buckets for d in cfg.data.dense):
        raise ValueError("data.dense[*].buckets: bucketized dense features are for pooled models (dlrm, dcnv2, logreg), "
                         "not model=hstu")
    if t.baseline and cfg.model.arch == Arch.hstu:
        raise ValueError("train.baseline=true trains logistic regression on the model's own features; model=hstu's "
                         "history features have no pooled form: set train.baseline=false (data=tabular turns it on) and compare with bench/models.py")
    if cfg.data.labels:
        check_task_names([lt.name for lt in cfg.data.labels])
        if cfg.data.source == DataSource.criteo:
            raise ValueError("data.labels: multi-task labels are read from in-memory sources; data.source=criteo streams one label")
        if any(lt.weight < 0 for lt in cfg.data.labels) or not any(lt.weight > 0 for lt in cfg.data.labels):
            raise ValueError(f"data.labels: weights {[lt.weight for lt in cfg.data.labels]} must be >= 0, one of them > 0")
    if cfg.data.source == DataSource.criteo:  # gzip files are dealt whole: too few fail, unequal ones are reported
        from adsfm.training.stream import resolve, unread_share

        unread = unread_share(resolve(cfg.data.stream.paths, "stream.paths"), dp, cfg.data.stream.gzip_split)
        if unread > 0.05 and cfg.data.stream.reader == StreamReader.files:
            print(f"[adsfm] warning: data.stream.gzip_split=whole: gzip files are read whole, one rank each, and ranks stop "
                  f"together when the smallest share runs dry: about {unread:.0%} of the training bytes go unread each epoch "
                  f"over {dp} data-parallel ranks; use gzip_split=striped, more equal-sized files, or TSV or parquet", flush=True)
    fs = load_features(cfg.data, cfg.model.tables)
    model = build_model(fs.spec, cfg.model, device="meta")  # raises on inconsistent sizes and features
    validate_parallel(p, table_names(model), table_dim(cfg.model), t.sparse_optimizer)
    cast(SparseDenseModel, model).parallel_plan(dense_degrees(p, p.num_workers)[1])  # raises when it cannot split over tp
    check_plan(model, p)
    if cfg.data.source != DataSource.criteo and len(fs.train_idx) < t.batch_size:
        raise ValueError(f"train.batch_size({t.batch_size}) > training rows({len(fs.train_idx)})")
    return fs.spec


def check_plan(model: Any, p: Any) -> None:
    """Plan here, as the workers will, so tables that fit nowhere fail before any worker starts."""
    import logging
    import warnings

    from torchrec.distributed.planner.types import PlannerError

    from adsfm.parallel.plan import make_plan

    ranks = p.sparse_group or p.num_workers
    # The planner's warnings (a hand-built topology) and its error dump are for workers' logs, not users.
    loggers = [logging.getLogger(n) for n in ("torchrec.distributed.planner", "MethodLogger-NullHandler")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # the planner's FutureWarning about its own storage reservation
            warnings.simplefilter("ignore", FutureWarning)
            make_plan(model, p, ranks, None)
    except PlannerError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"parallel: the planner places the tables on no layout of {ranks} rank(s) with "
            f"parallel.sharding_types={[str(t) for t in p.sharding_types]}, memory_per_rank_gb={p.memory_per_rank_gb}: {first}; "
            "allow more sharding types, more workers or more memory per rank"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_training(cfg_in: DictConfig | AdsfmConfig) -> TrainResult:
    cfg = as_config(cfg_in)
    spec = validate(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = to_plain(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    base = train_baseline(cfg, run_dir) if starts_from_baseline(cfg) else None

    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.mlflow.tracking_uri, cfg.run_root)
    exp_id = ensure_experiment(uri, cfg.mlflow.experiment, cfg.run_root)
    client = MlflowClient(uri)
    tags, name = {"adsfm.stage": "train"}, f"{cfg.experiment_name}-train"
    if os.environ.get(PARENT_ENV):  # one job of a Hydra sweep (training/sweep.py); run_dir is <sweep>/<job number>
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        name = f"{cfg.experiment_name}-job{run_dir.name}"
    run = client.create_run(exp_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    flat = _flatten(resolved)  # type: ignore[arg-type]
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in flat.items()])
    client.set_tag(run_id, "adsfm.data_fingerprint", data_fingerprint(cfg.data, check_collisions(cfg.data, cfg.model.tables)))
    client.log_artifact(run_id, str(run_dir / "config.yaml"))

    init_ray_for(cfg)  # first: it sets the environment Ray reads on import
    datasets, loop_extra = {}, {}
    if cfg.data.source == DataSource.criteo and cfg.data.stream.reader == StreamReader.ray_data:
        from adsfm.training.ray_data import train_dataset

        datasets["train"], loop_extra["dataset_rows"] = train_dataset(cfg.data, spec)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from adsfm.training.worker import train_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": resolved, "run_dir": str(run_dir), "tracking_uri": uri, "run_id": run_id,
                           "start_from": str(base.checkpoint) if base else None, **loop_extra},
        datasets=datasets or None,
        scaling_config=ScalingConfig(
            num_workers=cfg.parallel.num_workers,
            use_gpu=cfg.parallel.device == "cuda",
            resources_per_worker={"CPU": cfg.parallel.cpu_per_worker},
        ),
        torch_config=TorchConfig(backend=cfg.parallel.backend),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    raw = json.loads((run_dir / "train_result.json").read_text())
    from adsfm.training.plots import loss_curve

    loss_curve(raw["losses"], raw["eval_history"], run_dir / "loss_curve.png")
    for name in ("loss_curve.png", "sharding_plan.json", "sharding_plan.txt", "train_result.json"):
        client.log_artifact(run_id, str(run_dir / name))
    client.log_metric(run_id, "samples_per_second", raw["samples_per_second"])
    client.log_metric(run_id, "checkpoint_seconds", raw["checkpoint_seconds"])
    client.log_metric(run_id, "peak_rss_gb_max_rank", max(raw["peak_rss_bytes"]) / 1e9)
    if cfg.train.baseline and cfg.model.arch != Arch.logreg:
        raw["baseline"] = compare(cfg, raw["holdout"], base or train_baseline(cfg, run_dir))
        for k in ("holdout_auc_vs_baseline", "holdout_logloss_vs_baseline", "baseline_holdout_auc", "baseline_holdout_logloss"):
            client.log_metric(run_id, k, raw["baseline"][k])
        (run_dir / "train_result.json").write_text(json.dumps(raw, default=str))
    client.set_terminated(run_id)
    return TrainResult(run_id, run_dir, Path(raw["checkpoint"]), raw["holdout"], uri, raw)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
