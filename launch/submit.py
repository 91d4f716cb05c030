"""adsfm-submit [OPTIONS] [OVERRIDES...]: run adsfm-train on a Ray cluster through its Jobs API.

    adsfm-submit --address http://HEAD:8265 parallel=cw2 train.epochs=1 run_root=/shared/runs
    RAY_ADDRESS=http://HEAD:8265 adsfm-submit --no-wait experiment=synthetic_dlrm

The overrides are those of adsfm-train and are composed here first: a misspelt key fails on this machine
and nothing is submitted. The checkout ships as the job's working_dir (without .venv, runs, .git and
caches); the cluster's `python` needs adsfm's dependencies. Pass an absolute run_root that the cluster's
nodes share: a relative one lands inside the job's working_dir copy. Exit status: 0 when the job
SUCCEEDED (or, with --no-wait, was submitted), 1 when it FAILED or was STOPPED, 2 for invalid overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adsfm-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    ap.add_argument("--working-dir", type=Path, help="directory shipped to the cluster (default: this checkout)")
    ap.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the logs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for adsfm-train")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_intermixed_args(argv)  # options may come after overrides

    from adsfm.contract.cluster import InvalidOverrides, submit

    try:
        result = submit(args.address, args.overrides, args.working_dir, wait=not args.no_wait)
    except InvalidOverrides as e:
        print(f"[adsfm] invalid overrides, nothing submitted: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        print(f"[adsfm] {e}", file=sys.stderr)
        sys.exit(2)
    except ConnectionError as e:  # the dashboard did not answer: wrong --address, or the cluster is down
        print(f"[adsfm] {e}", file=sys.stderr)
        sys.exit(1)
    if args.no_wait:
        print(result.job_id)
        return
    print(f"[adsfm] job {result.job_id} {result.status}" + (f": {result.message}" if result.message else ""))
    if result.status != "SUCCEEDED":
        sys.exit(1)
