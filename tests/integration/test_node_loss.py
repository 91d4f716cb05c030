"""A whole Ray node lost mid-training (its raylet SIGKILLed): the run completes from its newest checkpoint
once a node joins again, and ends where an uninterrupted run ends (tests/integration/node_loss.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_training_survives_the_loss_of_a_node(small_cfg: Any, tmp_path: Path) -> None:
    out = tmp_path / "node_loss.json"
    proc = subprocess.run([sys.executable, "-m", "tests.integration.node_loss", str(out), str(tmp_path / "runs"),
                           str(small_cfg.data.cache_dir)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    straight, killed = r["straight"], r["killed"]
    diff = float(np.abs(np.array(killed["losses"]) - np.array(straight["losses"])).max())
    print(f"node lost (ranks {r['lost_ranks']} on it) after checkpoint step_{r['killed_at_step']}: resumed from {killed['resumed_from']}, done "
          f"{r['seconds_after_kill']:.0f} s after the kill; max |loss diff| vs uninterrupted {diff:.2e}; "
          f"AUC {killed['holdout']['auc']:.6f} vs {straight['holdout']['auc']:.6f}")
    assert killed["resumed_from"] is not None and killed["steps"] == straight["steps"] == 120
    assert int(Path(killed["resumed_from"]).name[5:]) < 120, "it resumed after the end, not mid-run"
    assert r["killed_at_step"] < 120, "the node was lost after the job had finished"
    np.testing.assert_allclose(killed["losses"], straight["losses"], atol=1e-5)  # the SIGKILL-worker test's tolerance
    for k in ("auc", "logloss", "ne"):
        assert abs(killed["holdout"][k] - straight["holdout"][k]) <= 1e-5, k
