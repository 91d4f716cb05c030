"""Does the deep model earn its place? Logistic regression, DLRM, DLRM + wide, DCN-v2 and HSTU on one
table each: the same split and epochs budget, on MovieLens-100k and on Criteo-shaped synthetic files.

    python bench/models.py [--quick] [--repeats 3] [--out FILE.json]

Every model trains through the real path (`run_training`: Ray Train, 2 workers, table-wise), so the
figures include what a researcher would get. MovieLens: the time-ordered per-user holdout, the default
3 epochs for every model (early stopping would take each user's latest training events away from training,
which costs more on this split than it saves: see the README). Criteo-shaped:
26 Zipf-skewed categorical and 13 integer columns written as gzip TSV by `write_synthetic_criteo` with
pairwise feature crosses (`--crosses`), a separate holdout file, streamed, one epoch each; HSTU needs a
user history, which these logs do not have. `ratios.auc_vs_logreg_<data>`: the best non-linear model's
holdout AUC over logistic regression's (> 1: it earns its place). Each cell runs `--repeats` times with
train.seed 0, 1, ... on the same split; figures are medians, with the min and max beside them. Multi-task: DLRM with two heads on
MovieLens (`experiment=movielens_multitask`: like = rating >= 4, love = rating = 5), each task's holdout
figures beside the one-task DLRM's (whose label is like).

    python bench/models.py --parts multitask   # one part: movielens, criteo, tabular (both kinds), tabular_additive,
                                               # tabular_crosses, multitask
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result, write  # noqa: E402

MODELS: dict[str, list[str]] = {
    "logreg": ["model=logreg"],
    "dlrm": ["model=dlrm"],
    "dlrm_wide": ["model=dlrm", "model.wide=true"],
    "dcnv2": ["model=dcnv2"],
    "hstu": ["experiment=movielens_hstu"],
}


def train(overrides: list[str], root: Path, name: str) -> dict[str, Any]:
    from adsfm.contract.config import compose
    from adsfm.training.job import run_training

    cfg = compose([f"run_root={root}", f"run_dir={root / name}", "train.progress=false", *overrides])
    r = run_training(cfg)
    return {"auc": r.holdout["auc"], "logloss": r.holdout["logloss"], "holdout_rows": r.holdout["n"],
            "baseline_auc": r.raw.get("baseline", {}).get("baseline_holdout_auc"),
            "auc_minus_baseline": r.raw.get("baseline", {}).get("holdout_auc_vs_baseline"),
            "train_seconds": r.raw["train_seconds"], "epochs_run": len(r.raw["eval_history"]),
            "best_epoch": r.raw.get("early_stopping", {}).get("best_epoch"), "tasks": [t.name for t in cfg.data.labels],
            "holdout": r.holdout}


REPEATS = 1


def repeated(overrides: list[str], root: Path, name: str) -> dict[str, Any]:
    """`train` REPEATS times with train.seed 0, 1, ... (the split and the files stay the same): each figure
    is the median, with every run's value under `runs` and the spread as `<figure>_min` / `_max`."""
    import statistics

    runs = [train([*overrides, f"train.seed={k}"], root / f"seed{k}", name) for k in range(REPEATS)]
    out: dict[str, Any] = {"runs": runs, "repeats": REPEATS, "tasks": runs[0]["tasks"]}
    figures = ["auc", "logloss", "train_seconds", "epochs_run", *(["baseline_auc", "auc_minus_baseline"] if runs[0]["baseline_auc"] is not None else []),
               *(f"{t}_{k}" for t in runs[0]["tasks"] for k in ("auc", "logloss", "ne", "calibration"))]
    for k in figures:
        values = [r[k] if k in r else r["holdout"][k] for r in runs]
        out[k], out[f"{k}_min"], out[f"{k}_max"] = statistics.median(values), min(values), max(values)
    out["best_epoch"] = runs[0]["best_epoch"] if REPEATS == 1 else None
    out.setdefault("baseline_auc", None)
    return out


def movielens(root: Path, epochs: int) -> dict[str, dict[str, Any]]:
    common = [f"train.epochs={epochs}"]
    out = {}
    for name, ov in MODELS.items():
        exp = [] if name == "hstu" else ["experiment=movielens_dlrm"]
        out[name] = repeated([*exp, *ov, *common], root / "movielens", name)
        print(f"movielens {name}: {out[name]}", flush=True)
    return out


def criteo(root: Path, rows: int, crosses: float) -> dict[str, dict[str, Any]]:
    from adsfm.training.stream import write_synthetic_criteo

    files = root / "criteo_files"
    files.mkdir(parents=True, exist_ok=True)
    train_files = [write_synthetic_criteo(files / f"day_{d}.gz", rows // 2, seed=d, crosses=crosses) for d in (0, 1)]
    holdout = write_synthetic_criteo(files / "day_23.gz", rows // 4, seed=23, crosses=crosses)
    common = ["experiment=criteo_dlrm", f"data.stream.paths=[{train_files[0]},{train_files[1]}]",
              f"data.stream.holdout_paths=[{holdout}]", "data.stream.hash_buckets=20000", f"data.stream.holdout_rows={rows // 4}",
              "train.epochs=1", "train.batch_size=1024"]
    out = {}
    for name, ov in MODELS.items():
        if name == "hstu":
            continue
        out[name] = repeated([*common, *ov], root / "criteo", name)
        print(f"criteo {name}: {out[name]}", flush=True)
    return out


def tabular(root: Path, rows: int, crosses: float) -> dict[str, dict[str, Any]]:
    """The default config on a Criteo-shaped tabular file (`data=tabular`: wide part, early stopping, the
    baseline trained first and the model started from it), the same without the start from the baseline,
    and plain DLRM (no wide part, no early stopping), each beside its baseline. Without `crosses` logistic
    regression is the true model: the case that shows whether the defaults lose to a linear model; with
    them, whether starting from the baseline still lets the deep part add what it can."""
    import pandas as pd

    from adsfm.training.stream import write_synthetic_criteo

    path = write_synthetic_criteo(root / f"tabular_{crosses}.parquet", rows, seed=5, crosses=crosses)
    data = ["data=tabular", f"data.path={path}", "data.label=label", "data.user_column=null", "data.item_column=null",
            "data.time_column=null", "data.history.length=0",
            "data.dense=[" + ",".join(f"{{name:int_{i},side:user}}" for i in range(13)) + "]",
            "data.sparse=[" + ",".join(f"{{name:cat_{i},side:user,hash_buckets:5000}}" for i in range(26)) + "]"]
    assert len(pd.read_parquet(path, columns=["label"])) == rows
    out = {}
    variants = {"default": [], "no_start_from_baseline": ["train.start_from_baseline=false"],
                "plain_dlrm": ["model.wide=false", "train.early_stopping=false"]}
    for name, ov in variants.items():
        r = repeated([*data, *ov], root / "tabular", name)
        out[name] = r
        print(f"tabular {name}: {r}", flush=True)
    return out


def multitask(root: Path, epochs: int) -> dict[str, Any]:
    r = repeated(["experiment=movielens_multitask", f"train.epochs={epochs}"], root / "multitask", "multitask")
    tasks = {t: {k: r[f"{t}_{k}"] for k in ("auc", "logloss", "ne", "calibration")} | {"auc_min": r[f"{t}_auc_min"], "auc_max": r[f"{t}_auc_max"]}
             for t in r["tasks"]}
    print(f"multitask: {tasks}", flush=True)
    return {"tasks": tasks, "train_seconds": r["train_seconds"], "epochs_run": r["epochs_run"]}


def table(data: str, rows: dict[str, dict[str, Any]]) -> str:
    base = rows["logreg"]["auc"]
    lines = [f"| {data} | model | holdout AUC, median (min-max) | vs logreg | logloss | train s | epochs (best) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        best = "" if r["best_epoch"] is None else f" ({r['best_epoch']})"
        lines.append(f"| | {name} | {r['auc']:.4f} ({r['auc_min']:.4f}-{r['auc_max']:.4f}) | {r['auc'] / base:.4f} | "
                     f"{r['logloss']:.4f} | {r['train_seconds']:.0f} | {r['epochs_run']:g}{best} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and rows (a smoke run, not the figures)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--crosses", type=float, default=1.0, help="strength of the Criteo-shaped data's feature crosses")
    ap.add_argument("--parts", default="movielens,criteo,tabular,multitask", help="comma-separated parts to run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell (train.seed 0, 1, ...); figures are medians")
    a = ap.parse_args()
    global REPEATS
    REPEATS = a.repeats
    parts = set(a.parts.split(","))
    epochs, rows = (1, 100_000) if a.quick else (3, 400_000)
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="adsfm-models-") as tmp:
        root = Path(tmp)
        if "movielens" in parts:
            data["movielens"] = movielens(root, epochs)
        if "criteo" in parts:
            data["criteo_synthetic"] = criteo(root, rows, a.crosses)
    values: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for d, rows_ in list(data.items()):
        for name, r in rows_.items():
            values[f"{d}_{name}_auc"] = r["auc"]
            values[f"{d}_{name}_auc_min"], values[f"{d}_{name}_auc_max"] = r["auc_min"], r["auc_max"]
            values[f"{d}_{name}_logloss"] = r["logloss"]
            values[f"{d}_{name}_train_s"] = r["train_seconds"]
        deep = max((n for n in rows_ if n != "logreg"), key=lambda n: rows_[n]["auc"])
        ratios[f"auc_vs_logreg_{d}"] = rows_[deep]["auc"] / rows_["logreg"]["auc"]
        values[f"{d}_best_model_is_{deep}"] = 1.0
        print(table(d, rows_), "\n", flush=True)
    if ratios:
        ratios["auc_vs_logreg"] = min(ratios.values())  # the weaker of the two: > 1 means it holds on both
    for kind, crosses in (("additive", 0.0), ("crosses", a.crosses)):
        if f"tabular_{kind}" not in parts and "tabular" not in parts:
            continue
        with tempfile.TemporaryDirectory(prefix="adsfm-models-") as tmp:
            tab = tabular(Path(tmp), rows // 4, crosses)
        for name, r in tab.items():
            key = f"tabular_{kind}_{name}"
            values[f"{key}_auc"], values[f"{key}_logreg_auc"] = r["auc"], r["baseline_auc"]
            values[f"{key}_auc_minus_logreg"] = r["auc_minus_baseline"]
            values[f"{key}_auc_minus_logreg_min"] = r["auc_minus_baseline_min"]
            values[f"{key}_auc_minus_logreg_max"] = r["auc_minus_baseline_max"]
            print(f"tabular ({kind}, {rows // 4} rows) {name}: AUC {r['auc']:.4f} vs logreg {r['baseline_auc']:.4f} "
                  f"(difference, median of {a.repeats}: {r['auc_minus_baseline']:+.4f}, "
                  f"{r['auc_minus_baseline_min']:+.4f} to {r['auc_minus_baseline_max']:+.4f}), best epoch {r.get('best_epoch')}")
        data[f"tabular_{kind}"] = tab
    if "multitask" in parts:
        with tempfile.TemporaryDirectory(prefix="adsfm-models-") as tmp:
            mt = multitask(Path(tmp), epochs)
        for task, m in mt["tasks"].items():
            values.update({f"movielens_multitask_{task}_{k}": v for k, v in m.items()})
        data["movielens_multitask"] = mt
    cfg = {"quick": a.quick, "parts": sorted(parts), "repeats": a.repeats, "epochs_movielens": epochs, "rows_criteo": rows, "crosses": a.crosses, "models": list(MODELS),
           "layout": "tw2 (2 Ray Train workers)"}
    res = result("models", cfg, values, ratios)
    res["tables"] = data
    write(res, a.out)


if __name__ == "__main__":
    main()
