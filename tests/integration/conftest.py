"""Real Ray clusters on 127.0.0.1 for the integration tests: an in-process one started once per session,
and `ray start --head` clusters (head_node, head_node_with_jobs) that a test joins by address."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from adsfm.contract.cluster import init_ray

    # An ingress replica that stops drains 30 s by default (time for HAProxy to stop sending it requests),
    # holding its CPU: on this 2-CPU cluster the next test's app would wait for it.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    init_ray(None, num_cpus=2)
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port for the session: Ray Serve's proxy keeps the options of its first start."""
    from tests.conftest import free_port

    return free_port()


class MlflowServer:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1:`port`, its store under `root`:
    stopped and started again, it serves the same store."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        import requests

        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the child holds it; closed here once started
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        log.close()
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not come up:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1."""
    from tests.conftest import free_port

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port()).start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class RayHead:
    address: str
    """GCS address, for cluster.address= / ray.init."""
    temp: Path
    """The cluster's --temp-dir: its session logs, and the string that names its processes."""
    dashboard_url: str | None = None
    """Jobs API / dashboard URL when started with one."""


@contextlib.contextmanager
def ray_head(dashboard: bool = False) -> Iterator[RayHead]:
    """`ray start --head` on 127.0.0.1 with 2 CPUs, stopped by its own processes afterwards."""
    from tests.conftest import free_port

    temp = Path(tempfile.mkdtemp(prefix="adsfm-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    # The venv first on PATH, as on a cluster node set up for adsfm: a submitted job's `python` is this one.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
           "--temp-dir", str(temp), "--disable-usage-stats"]
    dashboard_url = None
    if dashboard:
        dash_port = free_port()
        # The node agent's HTTP port (which the Jobs API submits through) on any free port: at Ray's default,
        # 52365, another Ray instance on this machine (the session cluster) holds it, and the agent then runs
        # without HTTP, so every submission gets "No available agent".
        cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                "--dashboard-agent-listen-port", "0"]
        dashboard_url = f"http://127.0.0.1:{dash_port}"
    else:
        cmd += ["--include-dashboard", "false"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        yield RayHead(f"127.0.0.1:{port}", temp, dashboard_url)
    finally:
        # Stop this cluster by its own processes (they name its temp dir), never with a machine-wide `ray stop`.
        stop_pids(pids_naming(str(temp)))


@pytest.fixture()
def head_node() -> Iterator[tuple[str, Path]]:
    """A `ray start --head` cluster without a dashboard: (GCS address, temp dir)."""
    with ray_head() as head:
        yield head.address, head.temp


@pytest.fixture()
def head_node_with_jobs() -> Iterator[RayHead]:
    """A `ray start --head` cluster whose dashboard serves the Jobs API, waited for until it answers."""
    import requests

    with ray_head(dashboard=True) as head:
        assert head.dashboard_url
        deadline = time.time() + 120
        while True:
            try:
                # 200 from the job list means the Jobs API is up and takes this machine's token (401 before).
                if requests.get(f"{head.dashboard_url}/api/jobs/", headers=ray_auth_headers(), timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                logs = "".join(p.read_text(errors="ignore")[-2000:] for p in head.temp.glob("session_*/logs/dashboard*.log"))
                raise RuntimeError(f"the dashboard at {head.dashboard_url} did not answer in 120 s:\n{logs}")
            time.sleep(0.5)
        yield head


def ray_auth_headers() -> dict[str, str]:
    """The bearer token `ray start` generated (token authentication is on by default in Ray 2.60)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def pids_naming(text: str) -> list[int]:
    """Processes whose command line names `text`, or whose working directory lies under it: a submitted job's
    driver names nothing of the cluster but runs in the working_dir copy inside its temp dir."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
                continue
            cwd = os.readlink(proc / "cwd")
            if cwd == text or cwd.startswith(text + "/"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def stop_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`: gcs_server and the autoscaler monitor of a
    `ray start` cluster outlast a SIGTERM by more than 10 s, and a test's cluster holds nothing worth saving."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait_s
        while time.time() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)


def _running(pid: int) -> bool:
    try:  # a zombie (state Z) is gone but for its parent's wait
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

