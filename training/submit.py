"""Send an `adsfm-train <overrides>` job to a Ray cluster through the Ray Jobs API (the cluster's dashboard).

The overrides are composed here first, so a misspelt key fails on this machine with Hydra's message
instead of minutes later on the cluster. The checkout ships as the job's working_dir: the job runs
`python -m launch.train` in that copy, with its conf/, so the cluster needs adsfm's dependencies but not
this revision of the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from training.config import AdsfmConfig

# The checkout's bulk is local state the job does not need, and Ray refuses a working_dir over 500 MiB
# (.venv alone is GiBs). Ray 2.60 already skips .git and .venv; listing them keeps that true if its default
# changes. Patterns are gitignore-style, relative to the working_dir.
WORKING_DIR_EXCLUDES = [
    ".venv/", ".git/", "runs/", "mlruns/", "outputs/", "multirun/", "mlflow.db",
    "__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.egg-info/",
]
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
    """The checkout this module was imported from (its launch/ and conf/ are what the job runs)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "launch" / "train.py").is_file() or not (root / "conf").is_dir():
        raise FileNotFoundError(
            f"{root} is not an adsfm checkout (no launch/train.py and conf/): pass --working-dir CHECKOUT"
        )
    return root


@contextlib.contextmanager
def _conf_of(working_dir: Path) -> Iterator[None]:
    """Compose with the conf/ that ships to the cluster, which is not this module's when --working-dir differs."""
    conf = working_dir / "conf"
    if not conf.is_dir():
        yield
        return
    old = os.environ.get("ADSFM_CONF")
    os.environ["ADSFM_CONF"] = str(conf)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ADSFM_CONF", None)
        else:
            os.environ["ADSFM_CONF"] = old


def validate_overrides(overrides: list[str], working_dir: Path | None = None) -> AdsfmConfig:
    """The config `adsfm-train <overrides>` would run; InvalidOverrides names the bad key or value."""
    from training.config import compose
    from training.job import as_config

    try:
        with _conf_of(working_dir) if working_dir else contextlib.nullcontext():
            return as_config(compose(list(overrides)))
    except Exception as e:  # Hydra and OmegaConf raise several types; all mean "these overrides are wrong"
        # Hydra's own message ("Could not override 'train.nope'") leaves the reason to its cause.
        reasons = [str(e)] + ([str(e.__cause__)] if e.__cause__ and str(e.__cause__) not in str(e) else [])
        raise InvalidOverrides(f"{shlex.join(overrides) or '(no overrides)'}: " + "\n".join(reasons)) from e


def entrypoint(overrides: list[str], python: str = "python") -> str:
    """The job's shell command; quoted because Ray runs it through a shell and overrides may hold spaces."""
    return shlex.join([python, "-m", "launch.train", *overrides])


def runtime_env(working_dir: Path, excludes: list[str] | None = None) -> dict[str, Any]:
    env_vars = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # The job's driver (training.job.init_ray) calls ray.init with env_vars of its own, some the same
        # keys as these; without this Ray refuses to merge the two runtime envs ("Failed to merge the Job's
        # runtime env") even when the values agree.
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


def client(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (or RAY_ADDRESS): the dashboard URL, e.g. http://127.0.0.1:8265."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS (the dashboard URL)")
    # `ray start` turns token authentication on by default in Ray 2.60 and the client reads the mode when
    # ray is first imported; the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(
    address: str | None,
    overrides: list[str],
    working_dir: Path | None = None,
    wait: bool = True,
    out: IO[str] | None = None,
    poll_s: float = 1.0,
    agent_wait_s: float = 120.0,
) -> Submitted:
    """Validate `overrides`, submit the job, and (with `wait`) stream its logs to `out` until it ends."""
    out = out or sys.stdout
    working_dir = (working_dir or checkout_root()).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a directory")
    cfg = validate_overrides(overrides, working_dir)
    if not Path(cfg.run_root).is_absolute():
        print(
            f"[adsfm] warning: run_root={cfg.run_root} is relative, so the job writes inside its working_dir copy "
            "on the cluster, which Ray garbage-collects; pass run_root=/an/absolute/path that the cluster's nodes share",
            file=sys.stderr,
        )
    renv = runtime_env(working_dir)  # before client(): it reads the user's RAY_AUTH_MODE, not client()'s default
    jobs = client(address)
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
            # (seen here right after `ray start`); that refusal is worth waiting out, others are not.
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
