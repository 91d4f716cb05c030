"""Checkpoint of a sequence model (HSTU) → split bundle: tables, user.onnx, candidate.onnx and a manifest
that says how they fit together; parity-checked against the eager model scoring all of a user's candidates
in one joint forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adsfm.contract.config import Precision
from adsfm.contract.manifest import Manifest, ParitySpec, SequenceSpec, TableFile
from adsfm.export.parity import eager_probs, featurization_parity, judge, write_reference
from adsfm.export.sparse import export_table
from adsfm.export.split import export_split
from adsfm.serving.sequence import SequenceEngine, SequenceInputs
from adsfm.training.data import FeatureSet
from adsfm.training.models.hstu import HSTU


def _row_inputs(model: HSTU, fs: FeatureSet, row: int) -> tuple[Any, ...]:
    s = model.seq
    return (fs.row_values(row, s.history), fs.row_values(row, s.actions), fs.row_values(row, s.times),
            {f: int(fs.row_values(row, f)[0]) for f in model.context_features}, int(fs.row_values(row, s.time)[0]))


def split_probs(engine: SequenceEngine, model: HSTU, fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """The bundle's probability for each row's own candidate (user graph, then candidate graph)."""
    out = np.empty(len(rows))
    for k, r in enumerate(rows):
        hist, acts, times, ctx, t = _row_inputs(model, fs, int(r))
        state = engine.encode(hist, acts, times, ctx, t)
        items = engine.item_tokens({f: fs.row_values(int(r), f) for f in model.item_features})
        out[k] = engine.run(SequenceInputs(items, t, state))[0]
    return out


@torch.no_grad()
def many_candidates_diff(engine: SequenceEngine, model: HSTU, fs: FeatureSet, rows: np.ndarray,
                         candidates: int, seed: int = 0) -> float:
    """Max |eager - split| probability when each of these rows' users scores `candidates` random items at
    once: the eager side is one joint forward (M-FALCON masking), the split side one cached user state."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for r in rows:
        hist, acts, times, ctx, t = _row_inputs(model, fs, int(r))
        cands = {f: rng.integers(0, model.table_of(f).shape[0], candidates) for f in model.item_features}
        eager = torch.sigmoid(model.score(torch.from_numpy(hist), torch.from_numpy(acts), torch.from_numpy(times), ctx,
                                          {f: torch.from_numpy(v) for f, v in cands.items()}, t)).double().numpy()
        state = engine.encode(hist, acts, times, ctx, t)
        split = engine.run(SequenceInputs(engine.item_tokens(cands), t, state))
        worst = max(worst, float(np.abs(eager - split).max()))
    return worst


def export_sequence_bundle(model: HSTU, fs: FeatureSet, out: Path, precision: dict[str, Precision], opset: int,
                           provenance: dict[str, Any]) -> Manifest:
    """Write the split bundle of an eager model; returns its manifest, parity not yet judged."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    d = model.sparse.embedding_configs()[0].embedding_dim
    tables: dict[str, TableFile] = {}
    for c in model.sparse.embedding_configs():
        file = f"table_{c.name}.safetensors"
        nbytes = export_table(model.sparse.embeddings[c.name].weight, precision[c.name], out / file)
        tables[c.name] = TableFile(dim=c.embedding_dim, precision=precision[c.name], file=file, bytes=nbytes)  # type: ignore[arg-type]
    export_split(model.dense, len(model.context_features), d, out, opset)
    (out / "item_store.json").write_text(json.dumps(fs.item_store))
    s = model.seq
    manifest = Manifest(
        arch="hstu", embedding_dim=d, features=fs.spec, tables=tables,
        sequence=SequenceSpec(history=s.history, actions=s.actions, times=s.times, time=s.time,
                              item_features=model.item_features, context_features=model.context_features,
                              max_history=model.max_history, num_layers=s.num_layers),
        **provenance,
    )
    manifest.write(out)
    return manifest


def sequence_parity(model: HSTU, out: Path, fs: FeatureSet, raw: pd.DataFrame, rows: np.ndarray, tolerance: float,
                    auc_margin: float, quantized: bool, candidates: int = 100, users: int = 20) -> tuple[ParitySpec, np.ndarray]:
    """Eager vs split on the parity rows (each row's own candidate) and on `users` of them scoring
    `candidates` items at once, and the raw values of the rows (frame `raw`) through the bundle's
    featurization: the verdict, and the split probabilities of the rows (for the model card)."""
    engine = SequenceEngine(out)
    split = split_probs(engine, model, fs, rows)
    many = many_candidates_diff(engine, model, fs, rows[:users], candidates)
    features = featurization_parity(engine, fs, raw, rows)
    eager = eager_probs(model, fs, rows)
    verdict = judge(eager, split, fs.labels[rows], tolerance, auc_margin, quantized, many, features)
    verdict.reference = write_reference(out, rows, eager)
    return verdict, split
