"""A model card a person reads in MLflow: metrics, plots, precision, parity, lineage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from adsfm.contract.manifest import Manifest
from adsfm.training.metrics import ranking_metrics, task_columns
from adsfm.training.plots import calibration_curve, roc_curve


def write_card(manifest: Manifest, probs: np.ndarray, labels: np.ndarray, out: Path, loss_curve: Path | None = None) -> Path:
    """`out/model_card.md` with roc.png, calibration.png (and loss_curve.png when the run has one)."""
    out.mkdir(parents=True, exist_ok=True)
    names = manifest.features.tasks or ["-"]
    per = {n: ranking_metrics(torch.from_numpy(p), torch.from_numpy(y))
           for n, p, y in zip(names, task_columns(probs), task_columns(labels), strict=True)}
    m = per[names[0]]
    first = task_columns(probs)[0], task_columns(labels)[0]  # the plots: the first (headline) task's
    roc_curve(*first, out / "roc.png", title="holdout ROC (exported bundle)" + (f", task {names[0]}" if len(per) > 1 else ""))
    calibration_curve(*first, out / "calibration.png")
    rows = "\n".join(f"| {n} | {x['auc']:.4f} | {x['logloss']:.4f} | {x['ne']:.4f} | {x['calibration']:.3f} |" for n, x in per.items())
    plots = ["![ROC](roc.png)", "![calibration](calibration.png)"]
    if loss_curve is not None and loss_curve.exists():
        shutil.copy(loss_curve, out / "loss_curve.png")
        plots.append("![loss curve](loss_curve.png)")
    p = manifest.parity
    tables = "\n".join(
        f"| {n} | {manifest.features.tables[n].rows} x {t.dim} | {manifest.features.tables[n].pooling} | {t.precision} "
        f"| {t.bytes:,} |" for n, t in manifest.tables.items()
    )
    text = f"""# adsfm model card

**Model**: {manifest.arch}, {len(manifest.sparse)} sparse features, {len(manifest.dense)} dense features,
embedding dim {manifest.embedding_dim}.

## Holdout metrics (exported bundle, {int(m['n'])} rows)
| task | AUC | logloss | NE | calibration |
|---|---|---|---|---|
{rows}

## Export
Parity: {'passed' if p and p.passed else 'FAILED'} ({p.reason() if p else 'not run'}); eager AUC {p.auc_eager if p else float('nan'):.4f}.

| table | shape | pooling | precision | bytes |
|---|---|---|---|---|
{tables}

## Lineage
- git commit: `{manifest.git_commit}`
- config hash: `{manifest.config_hash}`
- data fingerprint: `{manifest.data_fingerprint}`
- training run: `{manifest.train_run_id or '-'}`
- checkpoint: `{manifest.source_checkpoint}`
- versions: {', '.join(f'{k} {v}' for k, v in manifest.versions.items())}

## Plots
{chr(10).join(plots)}
"""
    path = out / "model_card.md"
    path.write_text(text)
    return path
