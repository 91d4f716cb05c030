"""The per-rank training function that Ray Train runs on every worker."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from parallel.plan import format_plan, plan_rows
from parallel.shard import OptimConfig, parallelize_dlrm
from training.checkpoint import save_checkpoint
from training.config import AdsfmConfig
from training.data import iter_batches, load_features
from training.loop import evaluate, global_mean, train_step
from training.models.dlrm import DLRMRanker


def optim_config(cfg: AdsfmConfig) -> OptimConfig:
    t = cfg.train
    return OptimConfig(t.sparse_optimizer, t.sparse_lr, t.dense_optimizer, t.dense_lr, t.weight_decay)


def train_worker(config: dict[str, Any]) -> None:
    """Build on meta, shard, train, evaluate, checkpoint; rank 0 logs to MLflow and writes train_result.json."""
    for name in ("", "torchrec", "fbgemm_gpu"):  # TBE and planner INFO lines drown the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg: AdsfmConfig = OmegaConf.merge(OmegaConf.structured(AdsfmConfig), config["cfg"])  # type: ignore[assignment]
    run_dir = Path(config["run_dir"])
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(max(1, int(os.environ.get("ADSFM_THREADS_PER_WORKER", "1"))))
    fs = load_features(cfg.data)

    model = DLRMRanker(fs.spec, cfg.model, device="meta")
    dmp, optimizer, plan = parallelize_dlrm(model, cfg.parallel, optim_config(cfg), torch.device("cpu"))
    rows = plan_rows(plan)
    client = None
    if rank == 0:
        print(f"[adsfm] sharding plan over {world} rank(s):\n{format_plan(rows)}", flush=True)
        (run_dir / "sharding_plan.json").write_text(json.dumps(rows, indent=1, default=str))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])

    steps_per_epoch = len(fs.train_idx) // cfg.train.batch_size
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, desc="train", disable=rank != 0 or not cfg.train.progress, mininterval=2.0)
    t0 = time.time()
    step = 0
    for epoch in range(cfg.train.epochs):
        batches = iter_batches(fs.train_idx, cfg.train.batch_size, rank, world, seed=cfg.train.seed + epoch)
        for rows_idx in batches:
            if step >= total:
                break
            loss = global_mean(train_step(dmp, optimizer, fs.take(rows_idx)))
            losses.append(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if client is not None and (step % cfg.train.log_every == 0 or step == total):
                client.log_metric(config["run_id"], "train_loss", loss, step=step)
        metrics = evaluate(dmp, fs, fs.holdout_idx, cfg.train.eval_batch_size)
        history.append({"epoch": epoch, "step": step, **metrics})
        if client is not None:
            bar.write(f"[adsfm] epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n"))
            for k in ("auc", "logloss", "ne", "calibration"):
                client.log_metric(config["run_id"], f"holdout_{k}", metrics[k], step=step)
        if step >= total:
            break
    bar.close()
    elapsed = time.time() - t0
    ckpt = save_checkpoint(dmp, run_dir / "checkpoints" / f"step_{step}")
    final = history[-1]
    if rank == 0:
        result = {
            "checkpoint": str(ckpt),
            "run_id": config["run_id"],
            "steps": step,
            "world_size": world,
            "train_seconds": elapsed,
            "samples_per_second": step * cfg.train.batch_size / max(elapsed, 1e-9),
            "losses": losses,
            "eval_history": history,
            "holdout": {k: final[k] for k in ("auc", "logloss", "ne", "calibration", "n")},
            "sharding_plan": rows,
        }
        (run_dir / "train_result.json").write_text(json.dumps(result, default=str))
    import ray.train

    ray.train.report({"holdout_auc": final["auc"], "step": step})
