"""adsfm-train against an existing Ray cluster, started here with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
# head_node: tests/integration/conftest.py (shared with test_submit.py)


def test_train_job_runs_on_a_cluster_by_address(head_node: tuple[str, Path], small_cfg: object, tmp_path: Path) -> None:
    address, temp = head_node
    cmd = [str(BIN / "adsfm-train"), f"cluster.address={address}", f"run_root={tmp_path}", "train.max_steps=20",
           "train.epochs=1", "train.progress=false", f"data.cache_dir={small_cfg.data.cache_dir}"]  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holdout auc=" in proc.stdout
    runs = list(tmp_path.glob("*/train_result.json"))
    assert len(runs) == 1
    # The workers ran on that cluster: its session logs hold their output.
    logs = "".join(p.read_text(errors="ignore") for p in temp.glob("session_*/logs/worker-*.out"))
    assert "[adsfm] sharding plan: " in logs and " over 2 rank(s)" in logs
