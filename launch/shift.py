"""adsfm-shift NAME: move traffic from the champion to the challenger in steps, judged on live traffic.

    adsfm-shift adsfm-movielens-dlrm --steps 5,25,50,100 --every 60s --max-error-rate 0.01 --max-p99-ms 50
    adsfm-shift adsfm-movielens-dlrm --rollback          # all traffic back to the champion, now
    adsfm-shift adsfm-movielens-dlrm --shadow            # the challenger scores a copy of each request, unseen

Each step writes the challenger's share to the registry (replicas follow within serve.reload_interval_s),
then watches the challenger's error rate and p99 over the step, as every replica reports them, and, with
--max-score-shift / --max-disagreement, how far its scores are from the champion's on a sample of the
requests it answered (the replicas score those with the champion too, at serve.shadow_rate, off the
request path). A limit
crossed puts all traffic back on the champion at once and exits 1. After the last step (100) holds, the
challenger becomes champion (recorded in the champion history) and the split is cleared. The split is
written with a lease (--lease) that this process renews while it watches: if it is killed, or its machine
goes, replicas put all traffic back on the champion once the lease lapses (adsfm_split_lease_lapsed in
/metrics says so); Ctrl-C or SIGTERM puts it back at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any


def _seconds(text: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for u in sorted(units, key=len, reverse=True):
        if text.endswith(u):
            return float(text[: -len(u)]) * units[u]
    return float(text)


def _steps(text: str) -> list[float]:
    steps = [float(s) for s in text.split(",") if s.strip()]
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
        raise argparse.ArgumentTypeError(f"--steps {text!r}: increasing percentages in (0, 100], e.g. 5,25,50,100")
    return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-shift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="registered model name (its champion and challenger aliases)")
    ap.add_argument("--steps", type=_steps, default=[5.0, 25.0, 50.0, 100.0], help="challenger's share per step, %% (default 5,25,50,100)")
    ap.add_argument("--every", type=_seconds, default=60.0, help="how long each step holds: 60s, 5m (default 60s)")
    ap.add_argument("--max-error-rate", type=float, default=0.01, help="challenger error rate that rolls back (default 0.01)")
    ap.add_argument("--max-p99-ms", type=float, default=100.0, help="challenger p99 that rolls back (default 100)")
    ap.add_argument("--min-requests", type=int, default=20, help="challenger requests a step needs before it may pass (default 20)")
    ap.add_argument("--max-score-shift", type=float, default=None,
                    help="mean |challenger - champion| probability, on requests the replicas score with both, that rolls back (default: not judged)")
    ap.add_argument("--max-disagreement", type=float, default=None,
                    help="share of the champion's top 10 missing from the challenger's, on those requests, that rolls back (default: not judged)")
    ap.add_argument("--lease", type=_seconds, default=30.0,
                    help="how long a split outlives this process if it is killed: 30s (default), 2m")
    ap.add_argument("--rollback", action="store_true", help="all traffic to the champion now, and stop")
    ap.add_argument("--shadow", action="store_true", help="shadow mode: the challenger scores copies, answers nothing")
    ap.add_argument("--no-promote", action="store_true", help="after the last step, leave the split as it is")
    ap.add_argument("--address", help="Ray cluster the app runs on (default: RAY_ADDRESS, else auto)")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)
    if args.lease <= 0:
        ap.error(f"--lease {args.lease:g}: must be positive")
    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from adsfm.contract.registry import Split, write_split
    from adsfm.contract.tracking import tracking_uri
    from adsfm.serving.shift import Limits, shift

    uri = tracking_uri(args.tracking_uri, "runs")
    client = MlflowClient(uri)
    try:
        client.get_registered_model(args.name)
    except MlflowException:
        print(f"[adsfm] no registered model {args.name!r} in {uri}; `adsfm-models` lists what there is, "
              f"--tracking-uri picks another store", file=sys.stderr)
        return 2
    if args.rollback:
        write_split(client, args.name, Split())
        print(f"[adsfm] {args.name}: all traffic on the champion (replicas follow within serve.reload_interval_s)")
        return 0
    if args.shadow:
        write_split(client, args.name, Split(shadow=True))
        print(f"[adsfm] {args.name}: challenger in shadow mode (scores copies; see adsfm_shadow_* in /metrics)")
        return 0
    limits = Limits(args.max_error_rate, args.max_p99_ms, args.min_requests, args.max_score_shift, args.max_disagreement)
    monitor = _monitor(args)
    # SIGTERM (a stopped job, a killed pod) unwinds like Ctrl-C: shift() puts the champion back on the way out.
    # Installed after ray.init, which replaces the handler with its own.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return shift(client, args.name, uri, args.steps, args.every, limits, monitor, promote_at_end=not args.no_promote,
                 lease_s=args.lease)


def _monitor(args: argparse.Namespace) -> Any:
    from adsfm.contract.cluster import init_ray
    from adsfm.serving.monitor import monitor

    init_ray(args.address or "auto")  # the cluster the replicas run on: their reports are there
    return monitor(args.name)
