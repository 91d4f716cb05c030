"""adsfm-models NAME: versions, aliases, lineage and the champion history of a registered model."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-models", description=__doc__)
    ap.add_argument("name", help="registered model name")
    ap.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = ap.parse_args(argv)

    from adsfm.contract.registry import describe
    from adsfm.contract.tracking import tracking_uri

    print(describe(args.name, tracking_uri(args.tracking_uri, "runs")))
