"""adsfm-data synth: Criteo-1TB-shaped click logs as files, at a scale set by one knob.

    adsfm-data synth --out data/criteo_s001 --rows 1000000 --scale 0.01 [--shards 4] [--formats parquet,tsv.gz]

Writes day_00.. training shards and a holdout shard (parquet and/or gzip TSV, the same rows in each),
and manifest.json with the per-column cardinalities (the real logs' times --scale), then prints the
command that trains on them through the streamed Criteo path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsfm-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write Criteo-shaped shards and a holdout shard")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--rows", type=int, required=True, help="training rows over all shards")
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--holdout-rows", type=int, default=100_000)
    s.add_argument("--scale", type=float, default=0.001, help="cardinalities: the Criteo 1TB logs' times this")
    s.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of id popularity (> 1)")
    s.add_argument("--formats", default="parquet", help="comma-separated: parquet, tsv.gz")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    from adsfm.training.synth import SynthSpec, synth

    spec = SynthSpec(rows=a.rows, shards=a.shards, holdout_rows=a.holdout_rows, scale=a.scale, zipf=a.zipf,
                     formats=a.formats.split(","), seed=a.seed)
    try:
        m = synth(spec, a.out, progress=not a.no_progress)
    except ValueError as e:
        sys.exit(f"adsfm-data synth: {e}")
    cards: list[int] = m["cardinalities"]  # type: ignore[assignment]
    fmt = spec.formats[0]
    files: dict[str, list[str]] = m["files"]  # type: ignore[assignment]
    holdout: dict[str, list[str]] = m["holdout"]  # type: ignore[assignment]
    print(f"[adsfm] wrote {spec.rows:,} training rows in {spec.shards} shard(s) and {spec.holdout_rows:,} holdout rows "
          f"({', '.join(spec.formats)}) under {a.out}; {sum(cards):,} ids over 26 columns (largest {max(cards):,})")
    print("train on them:\n  adsfm-train experiment=criteo_dlrm "
          f"'data.stream.paths=[{','.join(files[fmt])}]' 'data.stream.holdout_paths=[{','.join(holdout[fmt])}]' "
          f"'data.stream.num_embeddings_per_feature=[{','.join(map(str, cards))}]'")


if __name__ == "__main__":
    main()
