"""The per-rank training that Ray Train runs on every worker: a Trainer a reader can follow.

    trainer = Trainer(cfg, run_dir, tracking_uri, run_id)   # setup: data, model on meta, parallelize, plan
    trainer.resume()                                       # newest complete checkpoint, if any
    while trainer.train_epoch():                           # one epoch (or up to max_steps), then evaluate
        pass                                               # (and, with early stopping, judge it)
    trainer.finish()                                       # last checkpoint, train_result.json, report
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Generator
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from adsfm.contract.config import AdsfmConfig, TrainPipeline, typed
from adsfm.parallel.mesh import data_coords
from adsfm.parallel.plan import format_plan
from adsfm.parallel.shard import OptimConfig, parallelize_model
from adsfm.training.checkpoint import AsyncCheckpointer, latest_checkpoint, load_checkpoint, save_checkpoint
from adsfm.training.data import load_features, validation_split
from adsfm.training.loop import LossMeter, evaluate, train_step
from adsfm.training.managed import fresh_rows
from adsfm.training.models import build_model
from adsfm.training.pipeline import sparse_dist_steps
from adsfm.training.stream import train_source


def optim_config(cfg: AdsfmConfig) -> OptimConfig:
    t = cfg.train
    return OptimConfig(t.sparse_optimizer, t.sparse_lr, t.dense_optimizer, t.dense_lr, t.weight_decay)


class Trainer:
    """One rank's training run. Every rank runs the same steps (collectives need it); rank 0 also logs to
    MLflow, draws the progress bar and writes the run's files."""

    def __init__(self, cfg: AdsfmConfig, run_dir: Path, tracking_uri: str, run_id: str, start_from: str | None = None,
                 dataset_rows: int | None = None) -> None:
        # setup: data, the model built on meta, its tables sharded and dense layers parallelized by the layout
        for name in ("", "torchrec", "fbgemm_gpu"):  # TBE and planner INFO lines drown the progress bar
            logging.getLogger(name).setLevel(logging.WARNING)
        self.cfg, self.run_dir, self.run_id = cfg, run_dir, run_id
        self.start_from = Path(start_from) if start_from else None  # the baseline's checkpoint (training/baseline.py)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg.train.seed)
        torch.set_num_threads(max(1, int(os.environ.get("ADSFM_THREADS_PER_WORKER", "1"))))
        self.fs = load_features(cfg.data, cfg.model.tables)
        self.valid_idx = None
        if cfg.train.early_stopping:  # the validation rows leave the training rows; the holdout stays untouched
            fit, self.valid_idx = validation_split(self.fs, cfg.train.validation_fraction, cfg.data.seed)
            self.fs = dataclasses.replace(self.fs, train_idx=fit)
        self.task_weights = [lt.weight for lt in cfg.data.labels] or None
        model = build_model(self.fs.spec, cfg.model, device="meta")
        self.model, self.optimizer, self.plan = parallelize_model(model, cfg.parallel, optim_config(cfg), torch.device("cpu"))  # type: ignore[arg-type]
        self.client = None
        if self.rank == 0:
            table = format_plan(self.plan)
            kinds = sorted({str(r["sharding_type"]) for r in self.plan})
            print(f"[adsfm] sharding plan: {len(self.plan)} tables over {self.world} rank(s), {', '.join(kinds)} "
                  f"({run_dir / 'sharding_plan.txt'})", flush=True)
            (run_dir / "sharding_plan.txt").write_text(table + "\n")
            (run_dir / "sharding_plan.json").write_text(json.dumps(self.plan, indent=1, default=str))
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
        if cfg.train.failure_drill:  # tests kill a worker by this pid: kill -9 $(cat workers/rank0.pid)
            (run_dir / "workers").mkdir(exist_ok=True)
            (run_dir / "workers" / f"rank{self.rank}.pid").write_text(str(os.getpid()))

        t = cfg.train
        self.source = train_source(cfg.data, self.fs, t.batch_size, t.seed, dataset_rows)
        per_epoch = self.source.steps_per_epoch
        total = per_epoch * t.epochs if per_epoch is not None else 0  # 0: a stream, until its epochs end
        self.total = (min(total, t.max_steps) if total else t.max_steps) if t.max_steps else total
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.losses: list[float] = []
        self.history: list[dict[str, float]] = []
        self.epoch_rows: list[dict[str, int]] = []
        self.resumed_from: Path | None = None
        # Early stopping's memory: the best validation logloss so far, its epoch's checkpoint, and the epochs since.
        self.best: dict[str, Any] = {"logloss": math.inf, "epoch": None, "step": None, "checkpoint": None, "stale": 0,
                                     "stopped": False}
        self.meter = LossMeter()
        self.saver = AsyncCheckpointer() if t.async_checkpoint else None
        self.steps_run, self.t0 = 0, time.time()
        self.bar = tqdm(total=self.total or None, desc="train", disable=self.rank != 0 or not t.progress, mininterval=2.0)

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Continue from the newest complete checkpoint of the run (written by any number of ranks): the
        weights, the optimizer state, and the position in the sample stream."""
        resume = latest_checkpoint(self.run_dir / "checkpoints")
        if resume is None:
            self.start()
            return
        self.optimizer.init_state()  # materialize lazy optimizer state so the checkpoint loads in place
        state = load_checkpoint(self.model, resume, self.optimizer, self.fs.managed)
        self.step, self.losses, self.history = state["step"], state["losses"], state["eval_history"]
        per_epoch = self.source.steps_per_epoch
        if "epoch" in state:
            self.epoch, self.epoch_step = state["epoch"], state["epoch_step"]
        else:  # a checkpoint written before the position was recorded implies it from the step
            self.epoch, self.epoch_step = divmod(self.step, per_epoch) if per_epoch else (0, self.step)
        self.best = state.get("best", self.best)
        self.epoch_rows = state.get("epoch_rows", [])
        self.resumed_from = resume
        self.bar.update(self.step)
        if self.rank == 0:
            print(f"[adsfm] resumed from {resume} at step {self.step} ({self.world} rank(s))", flush=True)

    def start(self) -> None:
        """A fresh run: from the baseline's weights where the model starts from it; that start is then
        evaluated like an epoch (-1), and with early stopping judged as the first candidate."""
        if self.start_from is None:
            return
        from adsfm.training.baseline import start_from_baseline

        start_from_baseline(self.model, self.fs.spec, self.cfg.model, self.start_from)
        if self.rank == 0:
            self.bar.write(f"[adsfm] started from the baseline ({self.start_from}): the wide part its weights, the deep output zero")
        self.evaluate(epoch=-1)
        if self.valid_idx is not None:
            self.judge(epoch=-1)

    def position(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "losses": self.losses,
                "eval_history": self.history, "epoch_rows": self.epoch_rows, "best": self.best}

    # ------------------------------------------------------------------------------------------- train

    def done(self) -> bool:
        return (self.epoch >= self.cfg.train.epochs or bool(self.total and self.step >= self.total)
                or self.best["stopped"])

    def train_epoch(self) -> bool:
        """The rest of the current epoch (or up to max_steps), then its evaluation; False when training is over."""
        if self.done():
            return False
        t = self.cfg.train
        # The same sample order per epoch on every run: a resumed run skips the batches it already took.
        coords = data_coords()  # tensor-parallel peers take the same rows
        weights = torch.tensor(self.task_weights) if self.task_weights else None
        batches = fresh_rows(self.source.epoch(self.epoch, coords.dp_rank, coords.dp, skip=self.epoch_step), self.fs.managed, self.model)
        steps: Generator[float, None, None]
        if t.pipeline == TrainPipeline.sparse_dist:  # the next batch's ids travel while this one trains
            steps = sparse_dist_steps(self.model, self.optimizer, batches, weights)
        else:
            steps = (train_step(self.model, self.optimizer, batch, weights) for batch in batches)
        with closing(steps):  # a pipeline left at train.max_steps gives the model its forwards back
            for loss in steps:
                self.meter.add(loss)
                self.step += 1
                self.epoch_step += 1
                self.steps_run += 1
                self.bar.update(1)
                checkpoint = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0 and self.step != self.total
                if self.step % t.log_every == 0 or self.step == self.total or checkpoint:  # the same steps on every rank
                    self._log_losses()
                if checkpoint:
                    self.checkpoint(background=self.saver is not None)
                if self.step == self.total:
                    break
        self.losses.extend(self.meter.flush())
        self._log_rows()
        self.evaluate()
        if self.valid_idx is not None and self.judge():
            return False
        if self.total and self.step >= self.total:
            return False
        self.epoch, self.epoch_step = self.epoch + 1, 0
        return not self.done()

    def _log_rows(self) -> None:
        """Rows of the source this epoch, and how many a step took: nothing is dropped unsaid."""
        r = self.source.rows
        if r is None:  # stopped at train.max_steps, before the end of the data
            return
        self.epoch_rows.append({"epoch": self.epoch, "rows": r.rows, "trained": r.trained, "not_trained": r.not_trained})
        if self.client is not None:
            self.bar.write(f"[adsfm] epoch {self.epoch}: {r.rows:,} training rows, {r.trained:,} trained, {r.not_trained:,} "
                           f"not ({r.not_trained / max(r.rows, 1):.2%}: the last partial batch"
                           + self._untrained_why())
            self.client.log_metric(self.run_id, "epoch_rows", r.rows, step=self.step)
            self.client.log_metric(self.run_id, "epoch_rows_trained", r.trained, step=self.step)

    def _untrained_why(self) -> str:
        d = self.cfg.data
        if d.source != "criteo":
            return ")"
        if d.stream.reader == "ray_data":
            return ", and the rows the streaming split left over to make the ranks' shares equal)"
        return ", and what other ranks held when the first ran dry)"

    def _log_losses(self) -> None:
        self.losses.extend(self.meter.flush())
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", refresh=False)
        if self.client is not None:
            self.client.log_metric(self.run_id, "train_loss", self.losses[-1], step=self.step)

    def checkpoint(self, background: bool = False) -> Path:
        directory = self.run_dir / "checkpoints" / f"step_{self.step}"
        keep = self.cfg.train.keep_checkpoints
        if background and self.saver is not None:
            self.saver.save(self.model, directory, self.optimizer, self.position(), keep=keep, managed=self.fs.managed)
            return directory
        return save_checkpoint(self.model, directory, self.optimizer, self.position(), keep=keep, managed=self.fs.managed)

    # ---------------------------------------------------------------------------------------- evaluate

    def evaluate(self, epoch: int | None = None) -> dict[str, float]:
        """Holdout metrics of the current weights (every rank takes part: lookups are collectives); `epoch`
        labels them (default: the current epoch; -1: the start, before any step)."""
        epoch = self.epoch if epoch is None else epoch
        metrics = evaluate(self.model, self.fs, self.fs.holdout_idx, self.cfg.train.eval_batch_size, self.task_weights)
        self.history.append({"epoch": epoch, "step": self.step, **metrics})
        if self.client is not None:
            self.bar.write(f"[adsfm] epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n"))
            for k, v in metrics.items():
                if k != "n":
                    self.client.log_metric(self.run_id, f"holdout_{k}", v, step=self.step)
        return metrics

    def judge(self, epoch: int | None = None) -> bool:
        """Early stopping: this epoch's validation logloss against the best so far. A better one saves the
        weights as the run's best checkpoint; True when `train.patience` epochs in a row were not better."""
        t = self.cfg.train
        epoch = self.epoch if epoch is None else epoch
        assert self.valid_idx is not None
        metrics = evaluate(self.model, self.fs, self.valid_idx, t.eval_batch_size, self.task_weights)
        loss = metrics.get("loss", metrics["logloss"])  # several tasks: their weighted log losses, as trained
        self.history[-1].update({"valid_logloss": loss, "valid_auc": metrics["auc"]})
        if self.client is not None:
            self.client.log_metric(self.run_id, "valid_logloss", loss, step=self.step)
            self.client.log_metric(self.run_id, "valid_auc", metrics["auc"], step=self.step)
        if loss < self.best["logloss"]:
            directory = self.run_dir / "best" / f"step_{self.step}"
            self.best.update(logloss=loss, epoch=epoch, step=self.step, checkpoint=str(directory), stale=0)
            save_checkpoint(self.model, directory, self.optimizer, self.position(), keep=1, managed=self.fs.managed)
        else:
            self.best["stale"] += 1
            self.best["stopped"] = self.best["stale"] >= t.patience
        if self.rank == 0 and self.client is not None:
            self.bar.write(f"[adsfm] epoch {epoch}: valid logloss {loss:.4f} (best {self.best['logloss']:.4f}, "
                           f"epoch {self.best['epoch']})" + (", stopping early" if self.best["stopped"] else ""))
        return bool(self.best["stopped"])

    # ------------------------------------------------------------------------------------------ finish

    def finish(self) -> None:
        """The final checkpoint; rank 0 writes train_result.json; every rank reports to Ray Train."""
        if not self.history or self.step == 0:  # an untrained model is never a successful run
            raise RuntimeError("no training step ran: the training data yields no full batch on some rank "
                               "(data.stream.paths, train.batch_size)")
        self.bar.close()
        if self.saver is not None:
            self.saver.wait()
        elapsed = time.time() - self.t0
        t_ckpt = time.perf_counter()
        ckpt = self.checkpoint()
        ckpt_seconds = time.perf_counter() - t_ckpt
        peak_rss = gather_peak_rss()
        final = self.history[-1]
        chosen = ckpt
        if self.valid_idx is not None and self.best["checkpoint"]:  # export takes the best epoch's weights
            chosen = Path(self.best["checkpoint"])
            final = next(h for h in self.history if h["step"] == self.best["step"])
        if self.rank == 0:
            result = {
                "checkpoint": str(chosen),
                "last_checkpoint": str(ckpt),
                "run_id": self.run_id,
                "steps": self.step,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "world_size": self.world,
                "train_seconds": elapsed,
                "samples_per_second": self.steps_run * self.cfg.train.batch_size / max(elapsed, 1e-9),
                "losses": self.losses,
                "eval_history": self.history,
                "epoch_rows": self.epoch_rows,
                "holdout": {k: v for k, v in final.items() if k not in ("epoch", "step", "valid_logloss", "valid_auc")},
                "sharding_plan": self.plan,
                "checkpoint_seconds": ckpt_seconds,
                "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
                "peak_rss_bytes": peak_rss,
            }
            if self.valid_idx is not None:
                result["early_stopping"] = {"best_epoch": self.best["epoch"], "best_step": self.best["step"],
                                            "valid_logloss": self.best["logloss"], "stopped_early": self.best["stopped"],
                                            "epochs_run": len(self.history), "validation_rows": len(self.valid_idx)}
            (self.run_dir / "train_result.json").write_text(json.dumps(result, default=str))
        import ray.train

        ray.train.report({"holdout_auc": final["auc"], "step": self.step})


def gather_peak_rss() -> list[int]:
    """Every rank's peak resident memory so far, in bytes, in rank order (a collective)."""
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if not dist.is_initialized():
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [int(v) for v in out]


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker: the Trainer's phases in order."""
    trainer = Trainer(typed(AdsfmConfig, config["cfg"]), Path(config["run_dir"]), config["tracking_uri"], config["run_id"],
                      config.get("start_from"), config.get("dataset_rows"))
    trainer.resume()
    while trainer.train_epoch():
        pass
    trainer.finish()
