"""Checkpoint of a sequence model (HSTU) → split bundle: tables, user.onnx, candidate.onnx and a manifest
that says how they fit together; parity-checked against the eager model scoring all of a user's candidates
in one joint forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.manifest import Manifest, ParitySpec, SequenceSpec, SparseFeatureSpec, TableSpec
from export.parity import eager_probs, judge
from export.sparse import export_table
from export.split import export_split
from serving.sequence import SequenceInputs, SequenceRanker
from training.data import FeatureSet
from training.models.hstu import HSTURanker


def row_values(fs: FeatureSet, row: int, name: str) -> np.ndarray:
    """One row's values of a (jagged) feature."""
    values, lengths = fs.sparse[name]
    start = fs._offsets(name)[row]
    return values[start : start + lengths[row]]


def _row_inputs(model: HSTURanker, fs: FeatureSet, row: int) -> tuple[Any, ...]:
    s = model.seq
    return (row_values(fs, row, s.history), row_values(fs, row, s.actions), row_values(fs, row, s.times),
            {f: int(row_values(fs, row, f)[0]) for f in model.context_features}, int(row_values(fs, row, s.time)[0]))


def split_probs(ranker: SequenceRanker, model: HSTURanker, fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """The bundle's probability for each row's own candidate (user graph, then candidate graph)."""
    out = np.empty(len(rows))
    for k, r in enumerate(rows):
        hist, acts, times, ctx, t = _row_inputs(model, fs, int(r))
        state = ranker.encode(hist, acts, times, ctx, t)
        items = ranker.item_tokens({f: row_values(fs, int(r), f) for f in model.item_features})
        out[k] = ranker.run(SequenceInputs(items, t, state))[0]
    return out


@torch.no_grad()
def many_candidates_diff(ranker: SequenceRanker, model: HSTURanker, fs: FeatureSet, rows: np.ndarray,
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
        state = ranker.encode(hist, acts, times, ctx, t)
        split = ranker.run(SequenceInputs(ranker.item_tokens(cands), t, state))
        worst = max(worst, float(np.abs(eager - split).max()))
    return worst


def export_sequence_bundle(model: HSTURanker, fs: FeatureSet, out: Path, precision: dict[str, str], opset: int,
                           provenance: dict[str, Any]) -> Manifest:
    """Write the split bundle of an eager model; returns its manifest, parity not yet judged."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    d = model.sparse.embedding_configs()[0].embedding_dim
    tables: dict[str, TableSpec] = {}
    for c in model.sparse.embedding_configs():
        file = f"table_{c.name}.safetensors"
        nbytes = export_table(model.sparse.embeddings[c.name].weight, precision[c.name], out / file)
        t = fs.spec["tables"][c.name]
        tables[c.name] = TableSpec(rows=c.num_embeddings, dim=c.embedding_dim, pooling=t["pooling"],
                                   precision=precision[c.name], file=file, bytes=nbytes,  # type: ignore[arg-type]
                                   hash_buckets=t["hash_buckets"], vocab=t["vocab"])
    export_split(model.dense, len(model.context_features), d, out, opset)
    (out / "item_store.json").write_text(json.dumps(fs.spec.get("item_store", {})))
    s = model.seq
    manifest = Manifest(
        model_type="hstu", embedding_dim=d, sparse=[SparseFeatureSpec(**f) for f in fs.spec["sparse"]], dense=[],
        tables=tables, item_column=fs.spec.get("item_column"), user_column=fs.spec.get("user_column"),
        sequence=SequenceSpec(history=s.history, actions=s.actions, times=s.times, time=s.time,
                              item_features=model.item_features, context_features=model.context_features,
                              max_history=model.max_history, num_layers=s.num_layers),
        **provenance,
    )
    manifest.write(out)
    return manifest


def sequence_parity(model: HSTURanker, out: Path, fs: FeatureSet, rows: np.ndarray, tolerance: float, auc_margin: float,
                    quantized: bool, candidates: int = 100, users: int = 20) -> tuple[ParitySpec, np.ndarray]:
    """Eager vs split on the parity rows (each row's own candidate) and on `users` of them scoring
    `candidates` items at once: the verdict, and the split probabilities of the rows (for the model card)."""
    ranker = SequenceRanker(out)
    split = split_probs(ranker, model, fs, rows)
    many = many_candidates_diff(ranker, model, fs, rows[:users], candidates)
    return judge(eager_probs(model, fs, rows), split, fs.labels[rows], tolerance, auc_margin, quantized, many), split
