"""The canary policy: move traffic from the champion to the challenger in steps, each judged on what every
replica reported of the challenger; roll back at once when a limit is crossed, promote after the last step.

adsfm-shift (launch/shift.py) parses the command line and calls `shift`; the split it writes lives in the
registry (adsfm.contract.registry), which every replica reads.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from adsfm.contract.registry import CHALLENGER, Split, promote, read_traffic, write_split
from adsfm.serving.monitor import VersionStats


@dataclass(frozen=True)
class Limits:
    max_error_rate: float
    max_p99_ms: float
    min_requests: int
    max_score_shift: float | None = None
    """Mean |challenger - champion| probability on the requests compared; None: not judged."""
    max_disagreement: float | None = None
    """Mean share of the champion's top 10 missing from the challenger's; None: not judged."""
    min_compared: int = 5
    """Compared requests before the two quality figures are judged."""


def judge(stats: VersionStats | None, limits: Limits) -> str | None:
    """Why the challenger must be rolled back on this evidence, or None. Errors count from the first
    request (one failure in a handful is a failing model); p99 is judged once min_requests make it mean something."""
    if stats is None or stats.requests == 0:
        return None
    if stats.errors and stats.error_rate > limits.max_error_rate:
        return f"error rate {stats.error_rate:.1%} ({stats.errors}/{stats.requests}) > --max-error-rate {limits.max_error_rate:.1%}"
    if stats.requests >= limits.min_requests and stats.p99_ms > limits.max_p99_ms:
        return f"p99 {stats.p99_ms:.1f} ms over {stats.requests} requests > --max-p99-ms {limits.max_p99_ms:g}"
    if stats.compared >= limits.min_compared:
        if limits.max_score_shift is not None and stats.score_shift > limits.max_score_shift:
            return (f"mean score shift from the champion {stats.score_shift:.4f} over {stats.compared} compared requests "
                    f"> --max-score-shift {limits.max_score_shift:g}")
        if limits.max_disagreement is not None and stats.disagreement > limits.max_disagreement:
            return (f"top-10 disagreement with the champion {stats.disagreement:.1%} over {stats.compared} compared "
                    f"requests > --max-disagreement {limits.max_disagreement:g}")
    return None


def shift(client: Any, name: str, tracking_uri: str, steps: list[float], every_s: float, limits: Limits, monitor: Any,
          promote_at_end: bool = True, lease_s: float = 30.0) -> int:
    """Run the steps; returns the exit status: 0 promoted (or held at the last step), 1 rolled back, 2 nothing
    to shift. `client` is an MlflowClient, `monitor` the model's TrafficMonitor actor. Each split is written
    with a lease of `lease_s`, renewed while this process watches: killed, it leaves a split that replicas
    drop when the lease lapses. Interrupted (SIGINT, SIGTERM), it puts all traffic on the champion at once."""
    t = read_traffic(client, name)
    challenger = t.challenger
    if challenger is None or t.champion is None:
        print(f"[adsfm] {name}: needs both a champion and a {CHALLENGER} alias (now: champion {t.champion}, "
              f"{CHALLENGER} {challenger})", file=sys.stderr)
        return 2
    print(f"[adsfm] {name}: shifting champion v{t.champion} -> challenger v{challenger}: steps {steps} % "
          f"every {every_s:g}s; limits: error rate {limits.max_error_rate:.1%}, p99 {limits.max_p99_ms:g} ms"
          + (f", score shift {limits.max_score_shift:g}" if limits.max_score_shift is not None else "")
          + (f", top-10 disagreement {limits.max_disagreement:g}" if limits.max_disagreement is not None else "")
          + f"; lease {lease_s:g}s", flush=True)
    try:
        status = _steps(client, name, challenger, t.champion, steps, every_s, limits, monitor, lease_s)
    except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM, a registry or cluster error
        write_split(client, name, Split())
        print(f"[adsfm] {name}: interrupted; all traffic on champion v{t.champion}", file=sys.stderr, flush=True)
        raise
    if status != 0 or not promote_at_end:
        return status
    promote(name, tracking_uri, challenger, reason=f"adsfm-shift {','.join(f'{s:g}' for s in steps)}")
    write_split(client, name, Split())
    print(f"[adsfm] {name}: champion -> v{challenger}; split cleared", flush=True)
    return 0


def _steps(client: Any, name: str, challenger: str, champion: str, steps: list[float], every_s: float, limits: Limits,
           monitor: Any, lease_s: float) -> int:
    import ray

    for pct in steps:
        start = renewed = time.time()
        write_split(client, name, Split(challenger_pct=pct, lease_until=start + lease_s))
        while True:
            time.sleep(min(1.0, every_s, lease_s / 3))
            if time.time() - renewed >= lease_s / 3:  # renewed well before it lapses, a registry hiccup or two
                renewed = time.time()
                write_split(client, name, Split(challenger_pct=pct, lease_until=renewed + lease_s))
            stats = ray.get(monitor.window.remote(start)).get(challenger)
            reason = judge(stats, limits)
            if reason is not None:
                write_split(client, name, Split())
                print(f"[adsfm] {name}: ROLLED BACK at {pct:g} %: challenger v{challenger} {reason}; "
                      f"all traffic on champion v{champion}", file=sys.stderr, flush=True)
                return 1
            seen = 0 if stats is None else stats.requests
            if time.time() - start >= every_s and seen >= limits.min_requests:
                break
            if time.time() - start >= 5 * every_s:
                write_split(client, name, Split())
                print(f"[adsfm] {name}: ROLLED BACK at {pct:g} %: only {seen} challenger requests in "
                      f"{time.time() - start:.0f}s (< --min-requests {limits.min_requests}); nothing to judge it on",
                      file=sys.stderr, flush=True)
                return 1
        assert stats is not None
        print(f"[adsfm]   {pct:5.1f} % held {every_s:g}s: {stats.requests} challenger requests, "
              f"{stats.errors} errors, p99 {stats.p99_ms:.1f} ms; {stats.compared} compared with the champion: "
              f"score shift {stats.score_shift:.4f}, top-10 disagreement {stats.disagreement:.1%}", flush=True)
    return 0
