"""A wide-and-deep model started from the linear baseline (`train.start_from_baseline`, training/baseline.py):
its first state scores exactly as the baseline's checkpoint does (each table's wide columns and the dense
weights copied, the deep output zero), for one task and for two; while it trains, the baseline's weights per
id take no gradient and the deep part does (SGD, so a step shows as a change); and a partial state load
writes only the block it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.test_multitask import multi  # noqa: F401  (the fixture: the messy table with two tasks)


def _cfg(cfg: Any, arch: str, wide: bool) -> Any:
    from adsfm.contract.config import ModelConfig, to_plain, typed

    return typed(ModelConfig, {**to_plain(cfg.model), "arch": arch, "wide": wide})


def _model(spec: Any, cfg: Any, arch: str, wide: bool, seed: int) -> Any:
    from adsfm.training.models import build_model

    torch.manual_seed(seed)
    return build_model(spec, _cfg(cfg, arch, wide), device="cpu")


def _sgd(model: Any, batch: Any, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        logits = model(batch.dense_features, batch.sparse_features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


CASES = [("dlrm", 1), ("dcnv2", 1), ("dlrm", 2)]


@pytest.mark.parametrize(("arch", "tasks"), CASES, ids=[f"{a}-{t}task" for a, t in CASES])
def test_the_started_model_scores_exactly_as_the_baseline(arch: str, tasks: int, messy_features: Any, messy_cfg: Any,
                                                         multi: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    from adsfm.training.baseline import start_from_baseline
    from adsfm.training.checkpoint import save_checkpoint

    fs = multi["fs"] if tasks == 2 else messy_features[1]
    batch = fs.take(np.arange(min(256, len(fs.labels))))
    base = _model(fs.spec, messy_cfg, "logreg", False, seed=1)
    _sgd(base, batch, steps=5)  # weights away from their initial values, so a copy that misses them shows
    save_checkpoint(base, tmp_path / "base")
    model = _model(fs.spec, messy_cfg, arch, True, seed=2)
    with torch.no_grad():
        before = model(batch.dense_features, batch.sparse_features)
        want = base(batch.dense_features, batch.sparse_features)
    assert (before - want).abs().max() > 1e-3  # the check below is not passed by chance
    start_from_baseline(model, fs.spec, _cfg(messy_cfg, arch, True), tmp_path / "base")
    with torch.no_grad():
        got = model(batch.dense_features, batch.sparse_features)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_baseline_weights_take_no_gradient_while_the_deep_part_learns(messy_features: Any, messy_cfg: Any,
                                                                          tmp_path: Path) -> None:
    from adsfm.training.baseline import start_from_baseline
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.models.wide import WIDE_COLS

    fs = messy_features[1]
    batch = fs.take(np.arange(256))
    base = _model(fs.spec, messy_cfg, "logreg", False, seed=1)
    save_checkpoint(base, tmp_path / "base")
    cfg = _cfg(messy_cfg, "dlrm", True)
    changed = {}
    for frozen in (True, False):
        model = _model(fs.spec, messy_cfg, "dlrm", True, seed=2)
        start_from_baseline(model, fs.spec, cfg, tmp_path / "base")
        model.dense.frozen_ids = frozen  # the control: the same step with the weights per id trainable
        tables = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("sparse.")}
        head = model.dense.deep.over_arch.model[-1].weight.clone()
        _sgd(model, batch, steps=2)
        after = model.state_dict()
        wide = max(float((after[k][:, -WIDE_COLS:] - v[:, -WIDE_COLS:]).abs().max()) for k, v in tables.items())
        deep = max(float((after[k][:, :-WIDE_COLS] - v[:, :-WIDE_COLS]).abs().max()) for k, v in tables.items())
        assert deep > 0 and float((model.dense.deep.over_arch.model[-1].weight.detach() - head).abs().max()) > 0
        changed[frozen] = wide
    assert changed[True] == 0 and changed[False] > 0


def test_a_partial_load_writes_only_its_block() -> None:
    from adsfm.parallel.shard import load_full_state

    m = torch.nn.Linear(6, 3)
    w0 = m.weight.detach().clone()
    load_full_state(m, {"weight": torch.ones(2, 2)}, at={"weight": (1, 4)})
    w = m.weight.detach()
    assert torch.equal(w[1:3, 4:6], torch.ones(2, 2))
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[1:3, 4:6] = False
    assert torch.equal(w[mask], w0[mask])
    load_full_state(m, {"weight": torch.full((2, 4), 7.0)}, at={"weight": (2, 4)})  # hangs over the edge: the overlap
    assert torch.equal(m.weight.detach()[2, 4:6], torch.full((2,), 7.0)) and torch.equal(m.weight.detach()[1, 4:6], torch.ones(2))
    with pytest.raises(KeyError, match="bogus"):
        load_full_state(m, {"bogus": torch.ones(1)}, at={})
    with pytest.raises(KeyError, match="bias"):
        load_full_state(m, {"weight": torch.ones(3, 6)})  # a full load must cover every key
