"""A killed worker costs only the steps since the last checkpoint; checkpoints reshard across world sizes.

Real Ray Train on a local cluster: a worker process gets SIGKILL mid-training, Ray restarts the worker
group, the job resumes from the newest complete checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _cfg(small_cfg: Any, run_dir: Path, *overrides: str) -> Any:
    from adsfm.contract.config import compose

    cfg = compose([f"run_root={run_dir.parent}", f"run_dir={run_dir}", "train.progress=false", "train.epochs=2", *overrides])
    cfg.data = small_cfg.data
    return cfg


def test_sigkilled_worker_resumes_from_the_last_checkpoint(ray_cluster: None, small_cfg: Any, tmp_path: Path) -> None:
    from adsfm.training.job import run_training

    common = ("train.max_steps=120", "train.checkpoint_every=30", "train.max_failures=2", "train.keep_checkpoints=0",
              "train.failure_drill=true")
    reference = run_training(_cfg(small_cfg, tmp_path / "straight", *common))

    run_dir = tmp_path / "killed"
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=run_training(_cfg(small_cfg, run_dir, *common))))
    thread.start()
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_30").exists():
        assert thread.is_alive() and time.time() < deadline, "the job ended or stalled before its first checkpoint"
        time.sleep(0.02)
    victim = int((run_dir / "workers" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    thread.join(timeout=600)
    result = box["result"]

    diff = np.abs(np.array(result.raw["losses"]) - np.array(reference.raw["losses"])).max()
    print(f"killed rank 1 (pid {victim}) after checkpoint step_{killed_at}; resumed from {result.raw['resumed_from']}; "
          f"max |loss diff| vs uninterrupted {diff:.2e}; AUC {result.holdout['auc']:.6f} vs {reference.holdout['auc']:.6f}")
    assert killed_at < 120, "the worker was killed after the job had finished"
    assert result.raw["resumed_from"] is not None, "the job did not restart from a checkpoint"
    assert result.raw["steps"] == 120
    np.testing.assert_allclose(result.raw["losses"], reference.raw["losses"], atol=1e-5)
    for k in ("auc", "logloss", "ne"):
        assert abs(result.holdout[k] - reference.holdout[k]) <= 1e-5, k


def test_two_worker_checkpoint_resumes_with_one(ray_cluster: None, small_cfg: Any, tmp_path: Path) -> None:
    from adsfm.training.job import run_training

    reference = run_training(_cfg(small_cfg, tmp_path / "straight", "train.max_steps=80"))
    run_dir = tmp_path / "resharded"
    first = run_training(_cfg(small_cfg, run_dir, "train.max_steps=40"))
    assert first.raw["world_size"] == 2
    second = run_training(_cfg(small_cfg, run_dir, "train.max_steps=80", "parallel=single"))
    assert second.raw["world_size"] == 1
    assert second.raw["resumed_from"] == str(run_dir / "checkpoints" / "step_40")
    diff = np.abs(np.array(second.raw["losses"]) - np.array(reference.raw["losses"])).max()
    print(f"2 ranks -> 1 rank at step 40: max |loss diff| vs uninterrupted 2-rank run {diff:.2e}")
    np.testing.assert_allclose(second.raw["losses"], reference.raw["losses"], atol=1e-4)
    assert abs(second.holdout["auc"] - reference.holdout["auc"]) <= 1e-4
