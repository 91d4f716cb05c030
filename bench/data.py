"""Criteo-format reader throughput: rows/s from file to model-ready batches, against a naive reader.

    python bench/data.py [--quick] [--out FILE.json] [--rows N]

Writes one Criteo-format file (label, 13 integers, 26 hex categoricals; Zipf ids, some empty fields) as
TSV, gzip and parquet, then measures in one run, each to the same end point (standardised dense floats and
hashed table rows for every line):
- adsfm's streaming reader (training/stream.py) on 1 worker for each format, and on 2 workers (2 processes,
  each reading only its half of the TSV; for gzip, each decompressing the whole file and keeping every
  other line) for the aggregate rate;
- a naive reader: the file read line by line in Python, split on tabs, every value converted and hashed
  on its own (no chunked parsing, no memo) -- what a hand-rolled loader does.

    python bench/data.py --readers [--rows N] [--repeats 3] [--out FILE.json]

instead trains one epoch of the Criteo DLRM on 2 Ray Train workers (tw2) from the same `adsfm-data synth`
parquet shards with each `data.stream.reader`: the workers reading their own shares of the files (files),
and a Ray Data dataset featurized in map_batches and split by Ray Train (ray_data). Reported: training
samples/s (median, min, max of the repeats), the driver's seconds before training (Ray Data counts the
rows), the holdout AUC and the epoch's rows trained, for each.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result, write  # noqa: E402

BATCH = 2048


def _stream_rows(cfg: Any, spec: dict[str, Any], rank: int, world: int) -> int:
    from adsfm.training.stream import CriteoSource

    return sum(len(c) for c in CriteoSource(cfg, spec, BATCH).local_batches(rank, world))


def _worker(args: tuple[Any, dict[str, Any], int, int]) -> tuple[int, float]:
    import torch

    import adsfm.training.stream  # noqa: F401 - imports (torch, torchrec: seconds) are not reading time

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    n = _stream_rows(*args)
    return n, time.perf_counter() - t0


def naive_rows(path: Path, spec: Any) -> int:
    """A line-by-line reader with the same rules (log1p, standardisation, hashing after the reserved rows)."""
    import numpy as np

    from adsfm.contract.features import stable_hash

    mean = np.array([d.mean for d in spec.dense])
    std = np.array([d.std for d in spec.dense])
    tables = [spec.tables[f.table] for f in spec.sparse]
    nd = len(mean)
    n = 0
    dense_rows, cat_rows = [], []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            x = np.array([float(v) if v else np.nan for v in parts[1 : 1 + nd]])
            dense_rows.append(np.nan_to_num((np.log1p(np.maximum(x, 0)) - mean) / std))
            cat_rows.append([t.first + stable_hash(v, t.hash_buckets) if v else t.missing_row
                             for v, t in zip(parts[1 + nd :], tables, strict=True)])
            n += 1
            if len(cat_rows) == BATCH:
                np.stack(dense_rows), np.array(cat_rows)
                dense_rows, cat_rows = [], []
    return n


def run(rows: int, quick: bool) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from adsfm.contract.config import DataConfig, StreamConfig
    from adsfm.training.stream import criteo_spec, write_synthetic_criteo

    values: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        files = {kind: write_synthetic_criteo(d / f"day_0.{kind}", rows, seed=0) for kind in ("tsv", "gz", "parquet")}
        print(f"wrote {rows:,} rows as tsv ({files['tsv'].stat().st_size / 2**20:.0f} MiB), gz, parquet "
              f"in {time.perf_counter() - t0:.0f} s")

        def cfg_for(path: Path) -> Any:
            c = OmegaConf.structured(DataConfig(source="criteo", stream=StreamConfig(hash_buckets=1_000_000)))
            c.stream.paths = [str(path)]
            c.stream.holdout_paths = [str(path)]
            return c

        spec = criteo_spec(cfg_for(files["tsv"]))
        table = []
        for kind, path in files.items():
            t0 = time.perf_counter()
            n = _stream_rows(cfg_for(path), spec, 0, 1)
            rate = n / (time.perf_counter() - t0)
            values[f"{kind}_rows_per_s_1w"] = rate
            table.append((f"adsfm stream, {kind}", "1", n, rate))
        ctx = mp.get_context("spawn")
        with ctx.Pool(2) as pool:
            t0 = time.perf_counter()
            parts = pool.map(_worker, [(cfg_for(files["tsv"]), spec, r, 2) for r in range(2)])
            wall = time.perf_counter() - t0
        n2 = sum(p[0] for p in parts)
        values["tsv_rows_per_s_2w"] = n2 / max(p[1] for p in parts)  # reading time, not process start-up
        values["tsv_rows_per_s_2w_wall"] = n2 / wall
        table.append(("adsfm stream, tsv", "2", n2, values["tsv_rows_per_s_2w"]))
        with ctx.Pool(2) as pool:  # striped gzip: each worker decompresses the whole file, keeps half the lines
            parts = pool.map(_worker, [(cfg_for(files["gz"]), spec, r, 2) for r in range(2)])
        values["gz_striped_rows_per_s_2w"] = sum(p[0] for p in parts) / max(p[1] for p in parts)
        table.append(("adsfm stream, gz striped", "2", sum(p[0] for p in parts), values["gz_striped_rows_per_s_2w"]))
        naive_path = files["tsv"]
        if quick:  # the naive reader is slow: time it on a prefix
            naive_path = d / "prefix.tsv"
            with open(files["tsv"]) as src, open(naive_path, "w") as dst:
                for i, line in enumerate(src):
                    if i >= min(rows, 50_000):
                        break
                    dst.write(line)
        t0 = time.perf_counter()
        n = naive_rows(naive_path, spec)
        values["naive_rows_per_s"] = n / (time.perf_counter() - t0)
        table.append(("naive line-by-line reader, tsv", "1", n, values["naive_rows_per_s"]))

    ratios = {
        "adsfm_vs_naive_rows_per_s": values["tsv_rows_per_s_1w"] / values["naive_rows_per_s"],
        "two_workers_vs_one": values["tsv_rows_per_s_2w"] / values["tsv_rows_per_s_1w"],
        "gz_striped_two_workers_vs_one": values["gz_striped_rows_per_s_2w"] / values["gz_rows_per_s_1w"],
    }
    print(f"\n{'reader':<34} {'workers':>7} {'rows':>10} {'rows/s':>10}")
    for name, w, n, rate in table:
        print(f"{name:<34} {w:>7} {n:>10,} {rate:>10,.0f}")
    print(f"\nadsfm vs naive (tsv, 1 worker): {ratios['adsfm_vs_naive_rows_per_s']:.1f}x; "
          f"2 workers vs 1: {ratios['two_workers_vs_one']:.2f}x (this machine has {os.cpu_count()} cores)")
    return result("data", {"rows": rows, "quick": quick, "batch": BATCH, "hash_buckets": 1_000_000, "format": "criteo 13 int + 26 cat"}, values, ratios)


def readers(rows: int, repeats: int) -> dict[str, Any]:
    import statistics

    from adsfm.contract.config import compose
    from adsfm.training.job import run_training
    from adsfm.training.synth import SynthSpec, synth

    values: dict[str, float] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="adsfm-readers-") as tmp:
        root = Path(tmp)
        m: Any = synth(SynthSpec(rows=rows, shards=4, holdout_rows=50_000, scale=0.01), root / "files", progress=False)
        base = ["experiment=criteo_dlrm", f"data.stream.paths=[{','.join(m['files']['parquet'])}]",
                f"data.stream.holdout_paths=[{m['holdout']['parquet'][0]}]",
                "data.stream.num_embeddings_per_feature=[" + ",".join(map(str, m["cardinalities"])) + "]",
                "train.batch_size=2048", "train.progress=false", f"run_root={root}"]
        for i in range(repeats):
            for reader in ("files", "ray_data"):
                t0 = time.perf_counter()
                r = run_training(compose([*base, f"data.stream.reader={reader}", f"run_dir={root / f'{reader}_{i}'}"]))
                wall = time.perf_counter() - t0
                runs.setdefault(reader, []).append({"samples_per_s": r.raw["samples_per_second"], "train_s": r.raw["train_seconds"],
                                                    "wall_s": wall, "auc": r.holdout["auc"], "epoch_rows": r.raw["epoch_rows"]})
                print(f"{reader} run {i}: {runs[reader][-1]}", flush=True)
    for reader, rs in runs.items():
        rates = [x["samples_per_s"] for x in rs]
        values[f"{reader}_train_samples_per_s"] = statistics.median(rates)
        values[f"{reader}_train_samples_per_s_min"], values[f"{reader}_train_samples_per_s_max"] = min(rates), max(rates)
        values[f"{reader}_wall_s"] = statistics.median(x["wall_s"] for x in rs)
        values[f"{reader}_auc"] = statistics.median(x["auc"] for x in rs)
        values[f"{reader}_rows_trained"] = rs[0]["epoch_rows"][0]["trained"]
    values["rows"] = rows
    ratios = {"ray_data_vs_files_train_samples_per_s": values["ray_data_train_samples_per_s"] / values["files_train_samples_per_s"]}
    print(f"ray_data vs files, training samples/s (median of {repeats}): {ratios['ray_data_vs_files_train_samples_per_s']:.2f}x")
    res = result("data_readers", {"rows": rows, "repeats": repeats, "layout": "tw2 (2 Ray Train workers)", "scale": 0.01}, values, ratios)
    res["runs"] = runs
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200k rows; the naive reader on a 50k-row prefix")
    ap.add_argument("--rows", type=int, help="rows in the generated file (default 1,000,000; --quick 200,000)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--readers", action="store_true", help="train on Ray with each data.stream.reader instead")
    ap.add_argument("--repeats", type=int, default=3, help="--readers: runs per reader")
    args = ap.parse_args()
    if args.readers:
        write(readers(args.rows or 400_000, args.repeats), args.out)
        return
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    res = run(rows, args.quick)
    write(res, args.out)


if __name__ == "__main__":
    main()
