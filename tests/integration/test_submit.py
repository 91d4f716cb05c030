"""adsfm-submit: an adsfm-train job sent through the Ray Jobs API of a `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.conftest import RayHead

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent

# Run in a fresh interpreter: the client must read RAY_AUTH_MODE when ray is first imported, and this
# process may already hold a ray imported for the session's token-less local cluster.
LIST_JOBS = """
import json, sys
from adsfm.contract.cluster import jobs_client
jobs = jobs_client(sys.argv[1]).list_jobs()
print(json.dumps({j.submission_id: {"status": str(j.status), "entrypoint": j.entrypoint} for j in jobs}))
"""


def _env() -> dict[str, str]:
    # A RAY_ADDRESS from the caller's shell would point the client elsewhere.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_a_bad_override_fails_before_anything_is_submitted() -> None:
    # Nothing listens on this port: had the command got as far as submitting, it would fail differently.
    cmd = [str(BIN / "adsfm-submit"), "--address", f"http://127.0.0.1:{free_port()}", "train.nope=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing submitted" in proc.stderr
    assert "train.nope" in proc.stderr
    assert "submitted raysubmit" not in proc.stdout


def test_the_job_command_and_environment() -> None:
    from adsfm.contract.cluster import WORKING_DIR_EXCLUDES, entrypoint, runtime_env

    overrides = ["run_root=/shared/my runs", "experiment_name=a'b"]
    cmd = entrypoint(overrides)
    assert shlex.split(cmd) == ["python", "-m", "adsfm.launch.train", *overrides]  # survives the job's shell
    env = runtime_env(Path("/x"))
    assert env["working_dir"] == "/x"
    assert env["excludes"] == WORKING_DIR_EXCLUDES
    assert {".venv/", ".git/", "runs/"} <= set(WORKING_DIR_EXCLUDES)
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_submit_runs_training_as_a_ray_job(head_node_with_jobs: RayHead, small_cfg: object, tmp_path: Path) -> None:
    head = head_node_with_jobs
    assert head.dashboard_url
    # run_root is absolute: the job runs in a copy of the checkout, where a relative one would land.
    cmd = [str(BIN / "adsfm-submit"), "--address", head.dashboard_url, "train.max_steps=20", "train.epochs=1",
           "train.progress=false", f"run_root={tmp_path}", f"data.cache_dir={small_cfg.data.cache_dir}"]  # type: ignore[attr-defined]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holdout auc=" in proc.stdout  # the job's logs were followed
    done = re.search(r"\[adsfm\] job (\S+) SUCCEEDED", proc.stdout)
    assert done, proc.stdout[-3000:]
    assert len(list(tmp_path.glob("*/train_result.json"))) == 1

    listing = subprocess.run([sys.executable, "-c", LIST_JOBS, head.dashboard_url], capture_output=True, text=True,
                             timeout=120, env=_env())
    assert listing.returncode == 0, listing.stderr[-3000:]
    jobs = json.loads(listing.stdout.strip().splitlines()[-1])
    job = jobs[done.group(1)]
    assert job["status"] == "SUCCEEDED"
    assert job["entrypoint"].startswith("python -m adsfm.launch.train ")
    # The workers ran on that cluster: its session logs hold their output.
    logs = "".join(p.read_text(errors="ignore") for p in head.temp.glob("session_*/logs/worker-*.out"))
    assert "[adsfm] sharding plan: " in logs and " over 2 rank(s)" in logs
