"""A two-node Ray cluster on 127.0.0.1 (Ray's own ray.cluster_utils.Cluster) loses a node mid-training.

    python -m tests.integration.node_loss OUT.json RUN_ROOT CACHE_DIR

Run in a process of its own (test_node_loss.py starts it): the cluster's nodes are this process's
children. One CPU per node, so the 2 workers of `tw2` take one node each. An uninterrupted run first;
then the same run, whose second node (its raylet and the worker under it) gets SIGKILL after the first
checkpoint; a fresh node joins
and Ray Train restarts the worker group from the newest checkpoint. OUT.json holds both results.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return int(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (children's parent ids)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main(out: Path, run_root: Path, cache_dir: str) -> None:
    # One auth mode for the cluster's nodes and the training driver (init_ray asks for tokens by default
    # when it joins by address; these nodes, all on 127.0.0.1 and this process's children, run without).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster

    # Node death noticed in about 2 s rather than Ray's default 30 s.
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 1000}
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={**node, "include_dashboard": False, "_system_config": fast})
    try:
        second = cluster.add_node(**node)
        cluster.wait_for_nodes()
        common = [f"cluster.address={cluster.address}", f"run_root={run_root}", "train.progress=false", "train.epochs=2",
                  "train.max_steps=120", "train.checkpoint_every=30", "train.max_failures=3", "train.keep_checkpoints=0",
                  "train.failure_drill=true", f"data.cache_dir={cache_dir}",
                  # A whole CPU per worker: with the default half CPU, Ray may pack both workers on the head.
                  "parallel.cpu_per_worker=1"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        straight = subprocess.run([str(BIN / "adsfm-train"), *common, f"run_dir={run_root / 'straight'}"], env=env,
                                  capture_output=True, text=True, timeout=900)
        assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

        run_dir = run_root / "killed"
        log = open(run_root / "killed.log", "w")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen([str(BIN / "adsfm-train"), *common, f"run_dir={run_dir}"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (run_dir / "checkpoints" / "step_30").exists():
            assert proc.poll() is None and time.time() < deadline, (run_root / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
        # The node goes away: its raylet and everything under it (the training worker it hosts) SIGKILLed.
        raylet = raylet_pid(second)
        doomed = [*descendants(raylet), raylet]
        ranks = {r: int((run_dir / "workers" / f"rank{r}.pid").read_text()) for r in (0, 1)}
        lost = [r for r, pid in ranks.items() if pid in doomed]
        assert lost, f"no training worker ran on the node to be lost (workers {ranks}, node processes {doomed})"
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        killed_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())
        cluster.add_node(**node)  # a replacement joins; the lost node's worker cannot come back
        code = proc.wait(timeout=900)
        log.close()
        assert code == 0, (run_root / "killed.log").read_text()[-5000:]
        result = {
            "straight": json.loads((run_root / "straight" / "train_result.json").read_text()),
            "killed": json.loads((run_dir / "train_result.json").read_text()),
            "killed_at_step": killed_at,
            "lost_ranks": lost,
            "seconds_after_kill": time.time() - killed,
        }
        out.write_text(json.dumps(result))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
