"""Export of a model trained on MovieLens: the DCP checkpoint without the training world, the streamed
eager reference, parity on the whole holdout, quantized bundles, raw requests against the eager model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def test_checkpoint_loads_without_the_training_world(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    from adsfm.export.bundle import load_trained_model

    loaded = load_trained_model(small_cfg, trained["checkpoint"], features)
    for k, v in trained["model"].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)


def test_streamed_reference_equals_the_whole_eager_model(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    """Export's eager reference loads one table at a time; it must be the TorchRec model's output."""
    from adsfm.export.bundle import load_dense, streamed_eager_probs
    from adsfm.export.parity import eager_probs

    idx = features.holdout_idx[:3000]
    dense = load_dense(small_cfg, trained["checkpoint"], features.spec)
    got = streamed_eager_probs(small_cfg, trained["checkpoint"], features, dense, idx)
    np.testing.assert_allclose(got, eager_probs(trained["model"], features, idx), atol=1e-6, rtol=0)


def test_bundle_passes_parity(trained: dict[str, Any], features: Any) -> None:
    p = trained["manifest"].parity
    assert p.passed and not p.quantized and p.rows == len(features.holdout_idx) and p.max_abs_diff <= 1e-5
    assert p.featurization == "identical"
    assert abs(p.auc_eager - trained["holdout"]["auc"]) < 1e-6


def test_raw_request_scores_like_the_eager_model(trained: dict[str, Any], features: Any, small_cfg: Any) -> None:
    """Serving featurizes raw values itself (vocabularies, hashing, normalisation, item store): the score of
    a holdout row sent as a raw request must equal the eager model's score on the training features."""
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.data import example_request, load_frame

    df, _ = load_frame(small_cfg.data)
    engine = DenseGraphEngine(trained["bundle"])
    rows = features.holdout_idx[:: max(1, len(features.holdout_idx) // 50)][:50]
    b = features.take(rows)
    with torch.no_grad():
        want = torch.sigmoid(trained["model"](b.dense_features, b.sparse_features)).double().numpy()
    for k, r in enumerate(rows):
        req = example_request(df, features.spec, int(r), [str(df.item_id.iloc[r])])
        got = engine.score(req["user"], req["candidates"])[0]
        assert abs(got - want[k]) <= 1e-5, f"row {r}: served {got:.6f} vs eager {want[k]:.6f}"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_bundle_keeps_holdout_auc(precision: str, trained: dict[str, Any], small_cfg: Any, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from adsfm.export.bundle import export_bundle

    cfg = OmegaConf.merge(small_cfg, {"export": {"precision": precision}})
    m = export_bundle(cfg, trained["checkpoint"], tmp_path / "b")  # type: ignore[arg-type]
    p = m.parity
    assert p is not None and p.quantized and p.passed
    assert p.auc_drop <= 0.002, p.reason()
    fp32 = trained["manifest"]
    ratio = sum(t.bytes for t in fp32.tables.values()) / sum(t.bytes for t in m.tables.values())
    # dim 16: fp16 halves the bytes; int8 stores 16 + 4 bytes per row instead of 64
    assert ratio > (1.9 if precision == "fp16" else 2.9), ratio
    assert (tmp_path / "b" / "card" / "model_card.md").exists()


def test_table_precision_names_a_table_of_the_model(small_cfg: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    from omegaconf import OmegaConf, open_dict

    from adsfm.export.bundle import export_bundle

    cfg = OmegaConf.merge(small_cfg, {})
    with open_dict(cfg):
        cfg.export.table_precision["itme"] = "int8"
    with pytest.raises(ValueError, match=r"export.table_precision names \['itme'\], which the model does not have"):
        export_bundle(cfg, trained["checkpoint"], tmp_path / "b")  # type: ignore[arg-type]
