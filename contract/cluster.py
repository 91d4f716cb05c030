"""The Ray cluster a command runs on: start or join it, choose Serve's ingress, keep the console readable,
and send a training job to a remote cluster through its Jobs API.

A neutral module below every layer: training, serving, export and launch all start Ray through `init_ray`.

Serve ingress (how HTTP requests reach the ranker replicas), fixed when the cluster starts:
- haproxy (the default where the binary is installed; scripts/setup_venv.sh installs Debian's package when
  it runs as root): Ray Serve's throughput-optimized mode with HAProxy in front. HAProxy listens on
  serve.port and balances across the replicas' own HTTP servers (direct ingress); user code runs on the
  replica's event loop; Serve's Python proxy is out of the request path.
- direct: throughput-optimized without HAProxy: replicas still serve HTTP themselves, but the public port is
  Serve's Python proxy (the only balancer left), so only the replica-side savings remain.
- proxy: Ray Serve's defaults (the Python HTTP proxy actor forwards every request to a replica).
bench/ingress.py measures all three; the README has the table. The settings are environment variables that
Ray's processes read when they start: `init_ray` sets them for a local cluster (with a 5 s drain for a
stopping replica instead of Ray's 30 s, since HAProxy runs on the same node); for `ray start` clusters set
them on every node (launch/cluster.yaml), where the 30 s drain stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from adsfm.contract.config import AdsfmConfig, Ingress

# Read by Ray when it is imported, so set before anything imports it: Ray would otherwise advertise the
# host's address (and report usage); a cluster started from here stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# ------------------------------------------------------------------------------------------------ ingress


HAPROXY_WRAPPER = """#!/bin/sh
# Written by adsfm (adsfm.contract.cluster): haproxy, with the front ends that Ray Serve's configuration binds
# on every interface (stats, prometheus) bound to {host} instead. Each start and reload passes the config
# file with -f; the bind lines are rewritten in it, then the real binary runs.
prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ] && [ -f "$arg" ]; then
    sed -i -E 's/^([[:space:]]*bind )(\\*|):([0-9]+)/\\1{host}:\\3/' "$arg"
  fi
  prev="$arg"
done
exec {binary} "$@"
"""


def haproxy_on(host: str, binary: str) -> str:
    """A wrapper of the haproxy binary that binds Ray Serve's stats and prometheus front ends to `host`
    (Ray 2.60 binds them on every interface, with no setting to change it); returns its path."""
    import hashlib

    text = HAPROXY_WRAPPER.format(host=host, binary=binary)
    path = Path(tempfile.gettempdir()) / "adsfm" / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.rename(path)
    return str(path)


def ingress_env(mode: Ingress | str, bind: str = "127.0.0.1") -> tuple[Ingress, dict[str, str]]:
    """(mode in effect, the environment that selects it); `auto` is haproxy when the binary is there. The
    HAProxy front ends listen on `bind` (the serving host)."""
    try:
        mode = Ingress(mode)
    except ValueError:
        raise ValueError(f"cluster.serve_ingress={mode!r}: use one of {', '.join(Ingress)}") from None
    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy") or ""
    if mode == Ingress.auto:
        mode = Ingress.haproxy if binary else Ingress.direct
    if mode == Ingress.haproxy and not binary:
        raise ValueError("cluster.serve_ingress=haproxy: no haproxy binary on PATH; `apt-get install haproxy` "
                         "(scripts/setup_venv.sh does as root) or use cluster.serve_ingress=direct")
    direct = mode in (Ingress.haproxy, Ingress.direct)
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if direct else "0",
           "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == Ingress.haproxy else "0"}
    if mode == Ingress.haproxy:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = haproxy_on(bind, binary) if bind not in ("0.0.0.0", "::") else binary
    if direct:
        # Throughput-optimized Serve stops copying replica logs to stderr: a replica that fails to start would
        # then fail `serve.run` with no reason on the console. Errors are rare lines; keep them visible.
        env["RAY_SERVE_LOG_TO_STDERR"] = "1"
        # A stopping ingress replica drains 30 s by default so that remote load balancers stop sending to it;
        # on one node HAProxy learns of it within 0.1 s, and 30 s would hold `serve.delete` (and a CPU) that long.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
    return mode, env


def apply_ingress(mode: Ingress | str) -> Ingress:
    """Set the ingress environment for Ray processes started from here on; a variable already set wins
    (one can still turn a single knob by hand). Returns the mode in effect."""
    mode, env = ingress_env(mode)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return mode


# ------------------------------------------------------------------------------------------- start / join


def ray_auth_as_ray_start() -> None:
    """Token authentication for a driver joining a cluster by address, decided as `ray start` decides it
    for the cluster (Ray 2.60): on when this machine has a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), off when it has none. Ray decides nothing for an explicit address: a driver that
    asks for tokens without one is refused, and one that does not ask is refused by a cluster that does.
    A RAY_AUTH_MODE already set is the user's choice and stays."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or (path.is_file() and path.read_text().strip()):
        os.environ["RAY_AUTH_MODE"] = "token"


def init_ray(address: str | None, num_cpus: int | None = None, serve_ingress: Ingress | str = Ingress.auto,
             log_file: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local cluster that stays on 127.0.0.1, with the Ray
    Serve ingress `serve_ingress` (a joined cluster has the one it was started with). With `log_file`, Ray's
    chatter goes there instead of the console (see `RayConsole`; commands install it first thing)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray_auth_as_ray_start()
    if log_file:
        RayConsole.install(Path(log_file))
    import ray

    if ray.is_initialized():
        return
    if not address:
        apply_ingress(serve_ingress)
    runtime_env = {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True)


def quiet_console(cfg: AdsfmConfig) -> None:
    """Route the console through `RayConsole` when the config names a log file (a command's first act, so
    that libraries imported later write through it too)."""
    if cfg.cluster.log_file:
        RayConsole.install(Path(cfg.cluster.log_file))


def init_ray_for(cfg: AdsfmConfig) -> None:
    """`init_ray` with the job's cluster section."""
    c = cfg.cluster
    init_ray(c.address, c.num_cpus, c.serve_ingress, c.log_file)


# Lines from Ray's processes that a person running a command does not need on the console: component INFO
# lines, native library loading, controllers' state-API retries, the driver loggers' INFO records.
_RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((?P<who>[^)]*?)(?: pid=\d+)?(?:, ip=[^)]*)?\)(?:\x1b\[0m)? ?")
_NOISE = re.compile(
    r"(^|\s)(INFO|DEBUG)(\s|$)|\bINFO\s+\S+\.py:\d+ --|Successfully loaded: 'fbgemm|Failed to query Ray Train Controller"
    r"|Setting up process group|Requesting resources|Attempting to start training worker group|core_worker\.cc"
    r"|Downloading artifacts|is_fx_tracing|Token authentication is enabled|HeuristicalStorageReservation"
    r"|Started a local Ray instance|mlflow\.store\.db\.utils|torchvision is not installed"
    r"|torch\.distributed is disabled|return func\(\*args, \*\*kwargs\)|Registered model '.*' already exists"
    r"|^Created version '|Successfully registered model"
)


class RayConsole:
    """stdout/stderr of this process, filtered: everything goes to a log file, and the console keeps what a
    person acts on: adsfm's own lines, progress bars, warnings and errors. Lines Ray forwards from its
    workers carry a `(Name pid=N)` prefix; of those the console shows adsfm's lines, the training progress
    bar and tracebacks."""

    _installed: Path | None = None

    def __init__(self, console: TextIO, log: IO[str]) -> None:
        self.console, self.log = console, log
        self._partial = ""

    @classmethod
    def install(cls, log_file: Path) -> None:
        """Filter this process's stdout and stderr from now on (once per process)."""
        if cls._installed is not None:
            return
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "a", buffering=1)  # noqa: SIM115 - held for the process's lifetime
        filtered = {id(sys.stdout): cls(sys.stdout, log), id(sys.stderr): cls(sys.stderr, log)}
        sys.stdout, sys.stderr = filtered[id(sys.stdout)], filtered[id(sys.stderr)]  # type: ignore[assignment]
        # Logging handlers made before this point (a library imported early) hold the real streams.
        loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
        for lg in loggers:
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and id(h.stream) in filtered:
                    h.setStream(filtered[id(h.stream)])
        for name in ("ray", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        cls._installed = log_file
        print(f"[adsfm] full console log: {log_file}", flush=True)

    @staticmethod
    def keep(line: str) -> bool:
        """Whether a console line is for a person (True) or for the log file only."""
        m = _RAY_PREFIX.match(line)
        if m:
            body = line[m.end():]
            return body.startswith(("[adsfm]", "train:", "Traceback", "  File ")) or "Error" in body.split(":")[0]
        return not _NOISE.search(line)

    def write(self, text: str) -> int:
        self.log.write(text)
        text = self._partial + text
        lines = text.split("\n")
        self._partial = lines.pop()
        out = [ln for ln in lines if self.keep(ln)]
        if out:
            self.console.write("\n".join(out) + "\n")
        # A progress bar redraws its line with \r and no newline: pass it through as it comes.
        if self._partial and "\r" in self._partial and self.keep(self._partial.rsplit("\r", 1)[-1] or self._partial):
            self.console.write(self._partial)
            self._partial = ""
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


# --------------------------------------------------------------------------------------- job submission

# The checkout's bulk is local state the job does not need, and Ray refuses a working_dir over 500 MiB.
WORKING_DIR_EXCLUDES = [
    ".venv/", ".git/", "runs/", "mlruns/", "outputs/", "multirun/", "mlflow.db",
    "__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.egg-info/",
]
PACKAGES = ("contract", "training", "parallel", "export", "serving", "launch")
"""The checkout's directories that make up the adsfm package (adsfm.<name>)."""
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class InvalidOverrides(ValueError):
    """The overrides do not compose onto the config schema; nothing was submitted."""


@dataclass
class Submitted:
    job_id: str
    status: str
    """A terminal status when waited for, else the status right after submission."""
    message: str = ""
    """Ray's explanation of the status (why a job failed)."""


def checkout_root() -> Path:
    """The checkout this module was imported from (its packages and conf/ are what the job runs)."""
    root = Path(__file__).resolve().parents[1]
    if not all((root / p / "__init__.py").is_file() for p in PACKAGES) or not (root / "conf").is_dir():
        raise FileNotFoundError(f"{root} is not an adsfm checkout (no {', '.join(PACKAGES)} and conf/): pass --working-dir CHECKOUT")
    return root


@contextlib.contextmanager
def _conf_of(checkout: Path) -> Iterator[None]:
    """Compose with the conf/ that ships to the cluster, which is not this module's when --working-dir differs."""
    old = os.environ.get("ADSFM_CONF")
    os.environ["ADSFM_CONF"] = str(checkout / "conf")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ADSFM_CONF", None)
        else:
            os.environ["ADSFM_CONF"] = old


def validate_overrides(overrides: list[str], checkout: Path | None = None) -> AdsfmConfig:
    """The config `adsfm-train <overrides>` would run; InvalidOverrides names the bad key or value."""
    from adsfm.contract.config import compose

    try:
        with _conf_of(checkout) if checkout and (checkout / "conf").is_dir() else contextlib.nullcontext():
            return compose(list(overrides))
    except Exception as e:  # Hydra and OmegaConf raise several types; all mean "these overrides are wrong"
        # Hydra's own message ("Could not override 'train.nope'") leaves the reason to its cause.
        reasons = [str(e)] + ([str(e.__cause__)] if e.__cause__ and str(e.__cause__) not in str(e) else [])
        raise InvalidOverrides(f"{shlex.join(overrides) or '(no overrides)'}: " + "\n".join(reasons)) from e


def entrypoint(overrides: list[str], python: str = "python") -> str:
    """The job's shell command; quoted because Ray runs it through a shell and overrides may hold spaces."""
    return shlex.join([python, "-m", "adsfm.launch.train", *overrides])


def stage_working_dir(checkout: Path, dest: Path) -> Path:
    """The job's working_dir: the checkout's packages under `adsfm/` (as an install lays them out, so
    `python -m adsfm.launch.train` imports this revision) and its conf/ beside them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for p in PACKAGES:
        shutil.copytree(checkout / p, dest / "adsfm" / p, ignore=ignore)
    shutil.copytree(checkout / "conf", dest / "conf", ignore=ignore)
    return dest


def runtime_env(working_dir: Path, excludes: list[str] | None = None) -> dict[str, Any]:
    env_vars = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # The job's driver (init_ray) calls ray.init with env_vars of its own, some the same keys as these;
        # without this Ray refuses to merge the two runtime envs even when the values agree.
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
    }
    # Driver and cluster must agree on authentication; an explicit choice here is the user's to pass on
    # (the cluster's own processes already run in the mode `ray start` chose).
    if os.environ.get("RAY_AUTH_MODE"):
        env_vars["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES if excludes is None else excludes),
        "env_vars": env_vars,
    }


def jobs_client(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (or RAY_ADDRESS): the dashboard URL, e.g. http://127.0.0.1:8265."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS (the dashboard URL)")
    ray_auth_as_ray_start()  # the client reads the mode when ray is first imported
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(
    address: str | None,
    overrides: list[str],
    working_dir: Path | None = None,
    wait: bool = True,
    out: IO[str] | None = None,
    poll_s: float = 1.0,
    agent_wait_s: float = 300.0,
) -> Submitted:
    """Validate `overrides`, submit the job, and (with `wait`) stream its logs to `out` until it ends."""
    out = out or sys.stdout
    checkout = (working_dir or checkout_root()).resolve()
    if not checkout.is_dir():
        raise FileNotFoundError(f"--working-dir {checkout} is not a directory")
    cfg = validate_overrides(overrides, checkout)
    if not Path(cfg.run_root).is_absolute():
        print(
            f"[adsfm] warning: run_root={cfg.run_root} is relative, so the job writes inside its working_dir copy "
            "on the cluster, which Ray garbage-collects; pass run_root=/an/absolute/path that the cluster's nodes share",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix="adsfm-job-") as tmp:
        renv = runtime_env(stage_working_dir(checkout, Path(tmp)))  # before jobs_client(): it reads the user's RAY_AUTH_MODE
        jobs = jobs_client(address)
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                job_id = jobs.submit_job(
                    entrypoint=entrypoint(overrides),
                    runtime_env=renv,
                    metadata={"adsfm.command": "adsfm-train", "adsfm.overrides": shlex.join(overrides)},
                )
                break
            except RuntimeError as e:
                # A head whose dashboard answers before its node agent has registered refuses jobs for a while
                # (seen right after `ray start`); that refusal is worth waiting out, others are not.
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)
    print(f"[adsfm] submitted {job_id} to {jobs.get_address()}: {entrypoint(overrides)}", file=out, flush=True)
    if not wait:
        return Submitted(job_id, str(jobs.get_job_status(job_id)))
    try:
        asyncio.run(_follow(jobs, job_id, out))
    except RuntimeError as e:  # the log stream broke (dashboard restart, proxy timeout): the job goes on
        print(f"[adsfm] log stream ended ({e}); waiting for the job's status", file=sys.stderr)
    except KeyboardInterrupt:
        # Ctrl-C stops following, not the job, which runs on the cluster.
        print(f"\n[adsfm] {job_id} keeps running; stop it with: ray job stop {job_id} --address {jobs.get_address()}",
              file=sys.stderr)
        raise
    status = str(jobs.get_job_status(job_id))
    while status not in TERMINAL:  # the stream can close a moment before the status is written
        time.sleep(poll_s)
        status = str(jobs.get_job_status(job_id))
    return Submitted(job_id, status, jobs.get_job_info(job_id).message or "")


async def _follow(jobs: Any, job_id: str, out: IO[str]) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
