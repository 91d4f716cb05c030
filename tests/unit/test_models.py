"""Every model that scores pooled embeddings (dlrm, dcnv2, logreg, with and without the wide part) exports
and serves through the same bundle: the served probability equals eager PyTorch's. Logistic regression is
checked against its formula in float64, and the wide part against the deep model it extends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

VARIANTS = [("dlrm", False), ("dlrm", True), ("dcnv2", False), ("dcnv2", True), ("logreg", False)]


def _model_cfg(cfg: Any, arch: str, wide: bool) -> Any:
    from adsfm.contract.config import ModelConfig, to_plain, typed

    return typed(ModelConfig, {**to_plain(cfg.model), "arch": arch, "wide": wide})


def _model(spec: Any, cfg: Any, arch: str, wide: bool) -> Any:
    from adsfm.training.models import build_model

    torch.manual_seed(0)
    return build_model(spec, _model_cfg(cfg, arch, wide), device="cpu").eval()


@pytest.mark.parametrize(("arch", "wide"), VARIANTS, ids=[f"{a}{'+wide' if w else ''}" for a, w in VARIANTS])
def test_every_pooled_model_serves_what_it_trained(arch: str, wide: bool, messy_features: Any, messy_cfg: Any,
                                                    tmp_path: Path) -> None:
    from adsfm.contract.config import Precision
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.export.parity import check_parity, eager_probs
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.models.pooled import table_dim

    _, fs = messy_features
    model = _model(fs.spec, messy_cfg, arch, wide)
    dim = table_dim(_model_cfg(messy_cfg, arch, wide))
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    assert all(w.shape[1] == dim for _, w in tables)
    manifest = write_dense_bundle(fs, tmp_path, tables, model.dense, {n: Precision.fp32 for n, _ in tables}, dim,
                                  messy_cfg.export.opset, {}, arch=arch)
    assert manifest.arch == arch and manifest.embedding_dim == dim
    idx = fs.holdout_idx
    p, probs = check_parity(eager_probs(model, fs, idx), DenseGraphEngine(tmp_path), fs, idx, 1e-5)
    assert p.passed and p.max_abs_diff <= 1e-5, p.summary()
    assert np.std(probs) > 0  # the scores depend on the row


def test_logreg_is_a_weight_per_id_and_per_value(messy_features: Any, messy_cfg: Any) -> None:
    _, fs = messy_features
    model = _model(fs.spec, messy_cfg, "logreg", False)
    batch = fs.take(fs.holdout_idx[:50])
    with torch.no_grad():
        got = model(batch.dense_features, batch.sparse_features).double().numpy()
    lin = model.dense.linear
    want = (batch.dense_features.double() @ lin.weight.double().T.squeeze(-1) + lin.bias.double()).detach()
    jts = batch.sparse_features.to_dict()
    for c in model.sparse.embedding_bag_configs():
        w = model.sparse.embedding_bags[c.name].weight.detach().double().mean(dim=1)  # WIDE_COLS columns, their mean
        mean = fs.spec.tables[c.name].pooling == "mean"
        for f in c.feature_names:
            jt = jts[f]
            for i, (lo, hi) in enumerate(zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist(), strict=True)):
                if hi > lo:
                    s = w[jt.values()[lo:hi]].sum()
                    want[i] += s / (hi - lo) if mean else s
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)


@pytest.mark.parametrize("arch", ["dlrm", "dcnv2"])
def test_a_zero_wide_part_leaves_the_deep_model(arch: str, messy_features: Any, messy_cfg: Any) -> None:
    _, fs = messy_features
    deep, wide = _model(fs.spec, messy_cfg, arch, False), _model(fs.spec, messy_cfg, arch, True)
    wide.dense.deep.load_state_dict(deep.dense.state_dict())
    with torch.no_grad():
        torch.nn.init.zeros_(wide.dense.linear.weight)
        torch.nn.init.zeros_(wide.dense.linear.bias)
        for c in deep.sparse.embedding_bag_configs():
            w = wide.sparse.embedding_bags[c.name].weight
            w[:, :-4] = deep.sparse.embedding_bags[c.name].weight
            w[:, -4:] = 0
    batch = fs.take(fs.holdout_idx[:64])
    with torch.no_grad():
        np.testing.assert_allclose(wide(batch.dense_features, batch.sparse_features).numpy(),
                                   deep(batch.dense_features, batch.sparse_features).numpy(), atol=1e-6)
        torch.nn.init.constant_(wide.dense.linear.bias, 0.5)  # and the wide part is really added
        assert not np.allclose(wide(batch.dense_features, batch.sparse_features).numpy(),
                               deep(batch.dense_features, batch.sparse_features).numpy(), atol=1e-3)


def test_logreg_refuses_tensor_parallel(messy_features: Any, messy_cfg: Any) -> None:
    _, fs = messy_features
    with pytest.raises(ValueError, match="logreg has no hidden layer"):
        _model(fs.spec, messy_cfg, "logreg", False).parallel_plan(2)
    assert _model(fs.spec, messy_cfg, "dcnv2", True).parallel_plan(2).tensor_parallel


def test_logreg_without_dense_inputs_is_ids_and_bias() -> None:
    from adsfm.training.models.wide import Wide

    wide = Wide(0, None)
    emb = torch.randn(3, 2, 4)
    with torch.no_grad():
        np.testing.assert_allclose(wide(torch.zeros(3, 0), emb).numpy(), (emb.mean(-1).sum(1) + wide.linear.bias).numpy(), atol=1e-6)
