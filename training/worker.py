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

from parallel.mesh import data_coords
from parallel.plan import format_plan
from parallel.shard import OptimConfig, parallelize_model
from training.checkpoint import AsyncCheckpointer, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import AdsfmConfig
from training.data import load_features
from training.loop import LossMeter, evaluate, train_step
from training.models import build_model
from training.stream import train_source


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

    model = build_model(fs.spec, cfg.model, device="meta")
    dmp, optimizer, rows = parallelize_model(model, cfg.parallel, optim_config(cfg), torch.device("cpu"))  # type: ignore[arg-type]
    client = None
    if rank == 0:
        table = format_plan(rows)
        print(f"[adsfm] sharding plan over {world} rank(s):\n{table}", flush=True)
        (run_dir / "sharding_plan.txt").write_text(table + "\n")
        (run_dir / "sharding_plan.json").write_text(json.dumps(rows, indent=1, default=str))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])

    pids = run_dir / "workers"
    pids.mkdir(exist_ok=True)
    (pids / f"rank{rank}.pid").write_text(str(os.getpid()))  # for failure drills: kill -9 $(cat ...)

    t = cfg.train
    source = train_source(cfg.data, fs, t.batch_size, t.seed)
    per_epoch = source.steps_per_epoch
    total = per_epoch * t.epochs if per_epoch is not None else 0  # 0: a stream, until its epochs end
    if t.max_steps:
        total = min(total, t.max_steps) if total else t.max_steps
    state: dict[str, Any] = {"step": 0, "losses": [], "eval_history": []}
    resume = latest_checkpoint(run_dir / "checkpoints")
    if resume is not None:
        optimizer.init_state()  # materialize lazy optimizer state so the checkpoint loads in place
        state = load_checkpoint(dmp, resume, optimizer)
        if rank == 0:
            print(f"[adsfm] resumed from {resume} at step {state['step']} ({world} rank(s))", flush=True)
    step: int = state["step"]
    losses: list[float] = state["losses"]
    history: list[dict[str, float]] = state["eval_history"]
    # Position in the sample stream; a checkpoint written before it was recorded implies it from the step.
    if "epoch" in state:
        epoch, epoch_step = state["epoch"], state["epoch_step"]
    else:
        epoch, epoch_step = divmod(step, per_epoch) if per_epoch else (0, step)

    def position() -> dict[str, Any]:
        return {"step": step, "epoch": epoch, "epoch_step": epoch_step, "losses": losses, "eval_history": history}

    bar = tqdm(total=total or None, initial=step, desc="train", disable=rank != 0 or not t.progress, mininterval=2.0)
    t0 = time.time()
    steps_run = 0
    meter = LossMeter()
    saver = AsyncCheckpointer() if t.async_checkpoint else None
    while epoch < t.epochs and not (total and step >= total):
        # The same sample order per epoch on every run: a resumed run skips the batches it already took.
        coords = data_coords()  # tensor-parallel peers take the same rows
        for batch in source.epoch(epoch, coords.dp_rank, coords.dp, skip=epoch_step):
            meter.add(train_step(dmp, optimizer, batch))
            step += 1
            epoch_step += 1
            steps_run += 1
            bar.update(1)
            checkpoint = bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step != total
            if step % t.log_every == 0 or step == total or checkpoint:  # the same steps on every rank
                losses.extend(meter.flush())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if client is not None:
                    client.log_metric(config["run_id"], "train_loss", losses[-1], step=step)
            if checkpoint and saver is not None:
                saver.save(dmp, run_dir / "checkpoints" / f"step_{step}", optimizer, position(), keep=t.keep_checkpoints)
            elif checkpoint:
                save_checkpoint(dmp, run_dir / "checkpoints" / f"step_{step}", optimizer, position(), keep=t.keep_checkpoints)
            if step == total:
                break
        losses.extend(meter.flush())
        metrics = evaluate(dmp, fs, fs.holdout_idx, t.eval_batch_size)
        history.append({"epoch": epoch, "step": step, **metrics})
        if client is not None:
            bar.write(f"[adsfm] epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n"))
            for k in ("auc", "logloss", "ne", "calibration"):
                client.log_metric(config["run_id"], f"holdout_{k}", metrics[k], step=step)
        if total and step >= total:
            break
        epoch, epoch_step = epoch + 1, 0
    if not history:
        raise RuntimeError("no training step ran: the training data yields no full batch (data.stream.paths, train.batch_size)")
    bar.close()
    if saver is not None:
        saver.wait()
    elapsed = time.time() - t0
    ckpt = save_checkpoint(dmp, run_dir / "checkpoints" / f"step_{step}", optimizer, position(), keep=t.keep_checkpoints)
    final = history[-1]
    if rank == 0:
        result = {
            "checkpoint": str(ckpt),
            "run_id": config["run_id"],
            "steps": step,
            "resumed_from": str(resume) if resume else None,
            "world_size": world,
            "train_seconds": elapsed,
            "samples_per_second": steps_run * t.batch_size / max(elapsed, 1e-9),
            "losses": losses,
            "eval_history": history,
            "holdout": {k: final[k] for k in ("auc", "logloss", "ne", "calibration", "n")},
            "sharding_plan": rows,
        }
        (run_dir / "train_result.json").write_text(json.dumps(result, default=str))
    import ray.train

    ray.train.report({"holdout_auc": final["auc"], "step": step})
