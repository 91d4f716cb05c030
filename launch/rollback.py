"""adsfm-rollback NAME: move champion back to the version it replaced, in one step.

    adsfm-rollback NAME                    # the champion alias back to the previous version
    adsfm-rollback NAME --delta 12         # the champion's embedding deltas after 12 withdrawn
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-rollback", description=__doc__)
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--reason", default="", help="recorded in the champion history")
    ap.add_argument("--delta", type=int, metavar="SEQ", help="withdraw the champion's deltas after SEQ instead (0: all)")
    ap.add_argument("--version", help="with --delta: this version's delta log rather than the champion's")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)

    from adsfm.contract.registry import rollback, rollback_deltas
    from adsfm.contract.tracking import tracking_uri

    if args.delta is not None:
        version, gone = rollback_deltas(args.name, tracking_uri(args.tracking_uri, "runs"), args.delta, args.version)
        print(f"[adsfm] {args.name} version {version}: deltas {gone or 'none'} withdrawn; replicas go back to delta {args.delta}")
        return
    old, new = rollback(args.name, tracking_uri(args.tracking_uri, "runs"), args.reason)
    print(f"[adsfm] {args.name}: champion {old} -> {new} (rolled back)")
