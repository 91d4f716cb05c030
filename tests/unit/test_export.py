"""Export on the messy synthetic table (an untrained DLRM): the ONNX graph against eager PyTorch, parity
that catches a perturbed table and a featurization that drifted from training's, raw requests that score
like the eager model, file names that cannot leave the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file


def test_onnx_dense_graph_matches_eager(messy_bundle: dict[str, Any]) -> None:
    import onnxruntime as ort

    model = messy_bundle["model"]
    sess = ort.InferenceSession(str(messy_bundle["bundle"] / "dense.onnx"))
    n_dense, n_sparse = model.dense.num_dense, len(model.feature_names)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 7, 300):
        dense = torch.randn(batch, n_dense, generator=g)
        emb = torch.randn(batch, n_sparse, 16, generator=g) * 0.3
        with torch.no_grad():
            want = model.dense(dense, emb).double().numpy()
        got = sess.run(None, {"dense": dense.numpy(), "embeddings": emb.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_parity_catches_a_perturbed_table(messy_bundle: dict[str, Any], tmp_path: Path) -> None:
    from adsfm.export.parity import ParityError, check_parity, eager_probs, require_parity
    from adsfm.serving.engine import DenseGraphEngine

    fs, idx = messy_bundle["features"], messy_bundle["features"].holdout_idx
    eager = eager_probs(messy_bundle["model"], fs, idx)
    p, _ = check_parity(eager, DenseGraphEngine(messy_bundle["bundle"]), fs, idx, 1e-5)
    assert p.passed and p.max_abs_diff <= 1e-5
    bundle = tmp_path / "bundle"
    shutil.copytree(messy_bundle["bundle"], bundle)
    path = str(bundle / "table_country.safetensors")
    table = load_file(path)
    table["weight"] = table["weight"] + np.random.default_rng(0).normal(0, 1e-2, table["weight"].shape).astype(np.float32)
    save_file(table, path)
    p, _ = check_parity(eager, DenseGraphEngine(bundle), fs, idx, 1e-5)
    assert not p.passed and p.max_abs_diff > 1e-5
    with pytest.raises(ParityError, match="not registered"):
        require_parity(p)


def test_featurization_parity_catches_a_vocabulary_that_drifted(messy_bundle: dict[str, Any], tmp_path: Path) -> None:
    """A bundle whose vocabulary maps raw values to other rows than training did (the skew a hand-written
    second featurization brings) fails export's parity, naming the feature."""
    from adsfm.export.parity import featurization_parity
    from adsfm.serving.engine import TableStore

    fs, frame = messy_bundle["features"], messy_bundle["frame"]
    idx = np.arange(len(frame))
    assert featurization_parity(TableStore(messy_bundle["bundle"]), fs, frame, idx) is None
    bundle = tmp_path / "bundle"
    shutil.copytree(messy_bundle["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["features"]["tables"]["country"]["vocab"].reverse()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "'country'" in (featurization_parity(TableStore(bundle), fs, frame, idx) or "")
    manifest["features"]["tables"]["country"]["vocab"].reverse()
    manifest["features"]["dense"][0]["mean"] += 1e-3
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "'bid'" in (featurization_parity(TableStore(bundle), fs, frame, idx) or "")


def test_raw_requests_score_like_the_eager_model(messy_bundle: dict[str, Any]) -> None:
    """Messy rows sent as raw requests (their user, their own item's values) score what the eager model gives
    training's featurized rows."""
    from adsfm.contract.features import is_missing
    from adsfm.serving.engine import DenseGraphEngine

    fs, frame, model = messy_bundle["features"], messy_bundle["frame"], messy_bundle["model"]
    engine = DenseGraphEngine(messy_bundle["bundle"])
    b = fs.take(np.arange(len(frame)))
    with torch.no_grad():
        want = torch.sigmoid(model(b.dense_features, b.sparse_features)).double().numpy()
    spec, key = fs.spec, fs.spec.item_column
    assert key
    checked = 0
    for r in range(len(frame)):
        values = {f.name: frame[f.source].iloc[r] for f in [*spec.sparse, *spec.dense]}
        item = {k: v for k, v in values.items() if k in spec.request_fields("item")}
        gaps = [k for k, v in item.items() if not isinstance(v, list) and is_missing(v)]
        if key in gaps or (gaps and engine.item_key(item, key) in engine.item_store):
            continue  # no id: not a candidate; a known item's missing value: the request takes the store's
        user = {k: v for k, v in values.items() if k in spec.request_fields("user")}
        got = engine.score(user, [item])[0]
        assert abs(got - want[r]) <= 1e-5, f"row {r}: served {got:.6f} vs eager {want[r]:.6f}"
        checked += 1
    assert checked > len(frame) // 2


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b", ""])
def test_manifest_file_names_stay_inside_the_bundle(messy_bundle: dict[str, Any], tmp_path: Path, name: str) -> None:
    from adsfm.contract.manifest import Manifest

    manifest = json.loads((messy_bundle["bundle"] / "manifest.json").read_text())
    manifest["tables"]["country"]["file"] = name
    with pytest.raises(ValueError, match="inside the bundle"):
        Manifest.model_validate(manifest)


def test_a_linked_file_that_leaves_the_bundle_is_refused(messy_bundle: dict[str, Any], tmp_path: Path) -> None:
    from adsfm.serving.engine import TableStore

    bundle = tmp_path / "bundle"
    shutil.copytree(messy_bundle["bundle"], bundle)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle / "table_country.safetensors", outside)
    (bundle / "table_country.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the bundle"):
        TableStore(bundle)
