"""Export: ONNX against eager PyTorch, DCP checkpoint without the training world, parity, raw requests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file


def test_onnx_dense_graph_matches_eager(trained: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime as ort

    model = trained["model"]
    sess = ort.InferenceSession(str(trained["bundle"] / "dense.onnx"))
    n_dense, n_sparse = model.dense.num_dense, len(model.feature_names)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 7, 300):
        dense = torch.randn(batch, n_dense, generator=g)
        emb = torch.randn(batch, n_sparse, 16, generator=g) * 0.3
        with torch.no_grad():
            want = model.dense(dense, emb).double().numpy()
        got = sess.run(None, {"dense": dense.numpy(), "embeddings": emb.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_checkpoint_loads_without_the_training_world(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    from export.bundle import load_trained_model

    loaded = load_trained_model(small_cfg, trained["checkpoint"], features)
    for k, v in trained["model"].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)


def test_streamed_reference_equals_the_whole_eager_model(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    """Export's eager reference loads one table at a time; it must be the TorchRec model's output."""
    from export.bundle import load_dense, streamed_eager_probs
    from export.parity import eager_probs

    idx = features.holdout_idx[:3000]
    dense = load_dense(small_cfg, trained["checkpoint"], features)
    got = streamed_eager_probs(small_cfg, trained["checkpoint"], features, dense, idx)
    np.testing.assert_allclose(got, eager_probs(trained["model"], features, idx), atol=1e-6, rtol=0)


def test_bundle_passes_parity(trained: dict[str, Any], features: Any) -> None:
    p = trained["manifest"].parity
    assert p.passed and not p.quantized and p.rows == len(features.holdout_idx) and p.max_abs_diff <= 1e-5
    assert abs(p.auc_eager - trained["holdout"]["auc"]) < 1e-6


def test_parity_catches_a_perturbed_table(trained: dict[str, Any], features: Any, tmp_path: Path) -> None:
    from export.parity import ParityError, check_parity, eager_probs, require_parity
    from serving.ranker import Ranker

    bundle = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], bundle)
    path = str(bundle / "table_occupation.safetensors")
    table = load_file(path)
    rng = np.random.default_rng(0)
    table["weight"] = table["weight"] + rng.normal(0, 1e-3, table["weight"].shape).astype(np.float32)
    save_file(table, path)
    idx = features.holdout_idx[:2048]
    p, _ = check_parity(eager_probs(trained["model"], features, idx), Ranker(bundle), features, idx, 1e-5)
    assert not p.passed and p.max_abs_diff > 1e-5
    with pytest.raises(ParityError, match="not registered"):
        require_parity(p)


def test_raw_request_scores_like_the_eager_model(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    """Serving featurizes raw values itself (vocabularies, hashing, normalisation, item store): the score of
    a holdout row sent as a raw request must equal the eager model's score on the training features."""
    from serving.ranker import Ranker
    from training.data import example_request, load_frame

    df, _ = load_frame(small_cfg.data)
    ranker = Ranker(trained["bundle"])
    rows = features.holdout_idx[:: max(1, len(features.holdout_idx) // 50)][:50]
    b = features.take(rows)
    with torch.no_grad():
        want = torch.sigmoid(trained["model"](b.dense_features, b.sparse_features)).double().numpy()
    for k, r in enumerate(rows):
        req = example_request(df, features.spec, int(r), [str(df.item_id.iloc[r])])
        got = ranker.score(req["user"], req["candidates"])[0]
        assert abs(got - want[k]) <= 1e-5, f"row {r}: served {got:.6f} vs eager {want[k]:.6f}"


def test_unknown_ids_use_the_oov_row(trained: dict[str, Any]) -> None:
    from serving.ranker import Ranker

    ranker = Ranker(trained["bundle"])
    spec = {f.name: f for f in ranker.manifest.sparse}
    np.testing.assert_array_equal(ranker.rows_of(spec["user_id"], "no-such-user", "user.user_id"), [0])
    np.testing.assert_array_equal(ranker.rows_of(spec["history"], ["1", "nope"], "user.history")[1:], [0])
    s_unknown = ranker.score({"user_id": "no-such-user"}, [{"item_id": "no-such-item"}])
    assert np.isfinite(s_unknown).all()
