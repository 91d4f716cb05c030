"""Does the bundle score like the eager model? The same holdout rows through both.

Two checks: the bundle featurizes raw holdout values exactly as training did (rows and dense inputs, bit for
bit, through serving's own path: the feature contract the manifest carries), and it scores training's
featurized rows like the eager model: fp32 bundles within a tolerance on every score; bundles with
quantized tables may differ by quantization error, so they are held to the holdout AUC they lose against
the eager fp32 model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from adsfm.contract.features import DenseFeatureSpec, SparseFeatureSpec
from adsfm.contract.manifest import ParitySpec
from adsfm.serving.engine import Bag, DenseGraphEngine, TableStore
from adsfm.training.data import FeatureSet
from adsfm.training.loop import predict
from adsfm.training.metrics import ranking_metrics, task_columns


class ParityError(RuntimeError):
    pass


REFERENCE_FILE = "parity_reference.safetensors"


def write_reference(out: Path, rows: np.ndarray, eager: np.ndarray) -> str:
    """The parity rows (indices into the data's frame) and the eager probabilities for them, in the bundle:
    what the promotion gate judges the bundle against. Returns the file's name (ParitySpec.reference)."""
    save_file({"rows": np.ascontiguousarray(rows, dtype=np.int64), "eager": np.ascontiguousarray(eager, dtype=np.float64)},
              str(out / REFERENCE_FILE))
    return REFERENCE_FILE


def read_reference(bundle: Path, spec: ParitySpec) -> tuple[np.ndarray, np.ndarray]:
    """(rows, eager probabilities) that export recorded; FileNotFoundError for a bundle without them."""
    if not spec.reference or not (bundle / spec.reference).is_file():
        raise FileNotFoundError(f"{bundle}: no parity reference recorded (exported before adsfm kept one); re-export it")
    ref = load_file(str(bundle / spec.reference))
    return ref["rows"], ref["eager"]


def bundle_probs(engine: DenseGraphEngine, fs: FeatureSet, idx: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The bundle's probabilities for already featurized rows (the serving lookup + ONNX path)."""
    out = []
    for s in range(0, len(idx), batch):
        b = fs.take(idx[s : s + batch])
        bags = {k: Bag(jt.values().numpy(), jt.lengths().numpy()) for k, jt in b.sparse_features.to_dict().items()}
        out.append(engine.score_indexed(b.dense_features.numpy(), bags))
    return np.concatenate(out) if out else np.zeros(0)


def parity_rows(fs: FeatureSet, rows: int) -> np.ndarray:
    """The holdout rows parity is checked on (all of them when rows is 0)."""
    idx = fs.holdout_idx if len(fs.holdout_idx) else fs.train_idx
    return idx[:rows] if rows else idx


@torch.no_grad()
def eager_probs(model: nn.Module, fs: FeatureSet, idx: np.ndarray) -> np.ndarray:
    """The eager PyTorch model's probabilities (the reference) for rows `idx`."""
    model.eval()
    return predict(model, fs, idx, 4096).double().numpy()


def featurization_parity(store: TableStore, fs: FeatureSet, df: pd.DataFrame, idx: np.ndarray, sample: int = 2000) -> str | None:
    """The raw values (frame `df`, in FeatureSet row order) of up to `sample` of rows `idx` through the
    bundle's featurization, against training's rows and dense inputs for them, bit for bit: None when
    identical, else the first difference."""
    idx = idx[:sample]
    raw = df.iloc[idx]
    features: list[SparseFeatureSpec | DenseFeatureSpec] = [*(f for f in fs.spec.sparse if not f.bucketizes), *fs.spec.dense]
    columns = {f.name: raw[f.source].tolist() for f in features}
    if fs.spec.item_column:
        columns[fs.spec.item_column] = raw[fs.spec.item_column].tolist()
    dense, bags = store.featurize_columns(columns)
    batch = fs.take(idx)
    for name, jt in batch.sparse_features.to_dict().items():
        if not (np.array_equal(jt.lengths().numpy(), bags[name].lengths) and np.array_equal(jt.values().numpy(), bags[name].values)):
            return f"feature {name!r}: the bundle's rows for raw holdout values differ from training's"
    if not np.array_equal(dense.view(np.uint32), fs.dense[idx].view(np.uint32)):
        col = int(np.argmax((dense != fs.dense[idx]).any(axis=0)))
        return f"dense input {fs.spec.dense_inputs()[col]!r}: the bundle's values for raw holdout values differ from training's"
    return None


def check_parity(
    eager: np.ndarray, engine: DenseGraphEngine, fs: FeatureSet, idx: np.ndarray, tolerance: float, auc_margin: float = 0.002,
    quantized: bool = False, features: str | None = None,
) -> tuple[ParitySpec, np.ndarray]:
    """The parity verdict for the eager probabilities of rows `idx` (and `features`, the verdict of
    featurization_parity), and the bundle's probabilities on them (for the model card)."""
    exported = bundle_probs(engine, fs, idx)
    return judge(eager, exported, fs.labels[idx], tolerance, auc_margin, quantized, features=features), exported


def judge(eager: np.ndarray, exported: np.ndarray, labels: np.ndarray, tolerance: float, auc_margin: float,
          quantized: bool, other_diff: float = 0.0, features: str | None = None) -> ParitySpec:
    """The verdict on the same rows' eager and exported probabilities: an fp32 bundle must match within
    `tolerance` (also `other_diff`, a difference measured elsewhere), a quantized one keep the holdout AUC
    within `auc_margin`; and `features` (a featurization difference) fails either. Several tasks ([n, T]):
    every score is compared, the AUCs are the first task's and the drop is the largest of any task's."""
    aucs = [(ranking_metrics(torch.from_numpy(e), torch.from_numpy(y))["auc"], ranking_metrics(torch.from_numpy(x), torch.from_numpy(y))["auc"])
            for e, x, y in zip(task_columns(eager), task_columns(exported), task_columns(labels), strict=True)]
    auc_eager, auc_bundle = aucs[0]
    diff = max(float(np.max(np.abs(eager - exported))), other_diff)
    drop = max(e - x for e, x in aucs)
    return ParitySpec(
        rows=len(eager), max_abs_diff=diff, tolerance=tolerance, auc_eager=auc_eager, auc_bundle=auc_bundle,
        auc_drop=drop, auc_margin=auc_margin, quantized=quantized, featurization=features or "identical",
        passed=features is None and (drop <= auc_margin if quantized else diff <= tolerance),
    )


def require_parity(p: ParitySpec) -> None:
    if not p.passed:
        raise ParityError(f"parity check failed: {p.reason()}; the bundle is not registered")
