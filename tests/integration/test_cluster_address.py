"""adsfm-train against an existing Ray cluster, started here with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture()
def head_node() -> Iterator[tuple[str, Path]]:
    temp = Path(tempfile.mkdtemp(prefix="adsfm-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
           "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        # Stop this cluster by its own processes (they name its temp dir), never with a machine-wide `ray stop`.
        _stop(_pids_naming(str(temp)))


def _pids_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 15
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


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
    assert "[adsfm] sharding plan over 2 rank(s)" in logs
