"""Multi-task heads (`data.labels`): one output per task through training, export and serving. Every pooled
model serves each task's probability as eager PyTorch computes it; the loss is the weighted sum of the
tasks' log losses (a task of weight 0 leaves its head untouched under SGD); a response carries every
task's score and ranks by `serve.rank_by`, which cannot run code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TASKS = [{"name": "click", "positive": "yes"}, {"name": "convert", "column": "converted", "positive": "yes", "weight": 0.5}]


@pytest.fixture(scope="module")
def multi(messy: Any, messy_cfg: Any) -> dict[str, Any]:
    """The messy table with a second label (a conversion: rarer, and only after a click), featurized with
    both tasks."""
    from adsfm.contract.config import DataConfig, to_plain, typed
    from adsfm.training.data import add_history, featurize

    frame = messy.copy()
    rng = np.random.default_rng(1)
    frame["converted"] = np.where((frame.clicked == "yes") & (rng.random(len(frame)) < 0.4), "yes", "no").astype(object)
    data = typed(DataConfig, {**to_plain(messy_cfg.data), "labels": TASKS})
    frame = add_history(frame, data)  # in the order featurize sees the rows
    return {"frame": frame, "data": data, "fs": featurize(frame, data)}


def _model(fs: Any, cfg: Any, arch: str, wide: bool = False) -> Any:
    from adsfm.contract.config import ModelConfig, to_plain, typed
    from adsfm.training.models import build_model

    torch.manual_seed(0)
    return build_model(fs.spec, typed(ModelConfig, {**to_plain(cfg.model), "arch": arch, "wide": wide}), device="cpu").eval()


def test_labels_are_one_column_per_task(multi: dict[str, Any]) -> None:
    fs, frame = multi["fs"], multi["frame"]
    assert fs.spec.tasks == ["click", "convert"] and fs.labels.shape == (len(frame), 2)
    np.testing.assert_array_equal(fs.labels[:, 0], (frame.clicked == "yes").to_numpy(np.float32))
    np.testing.assert_array_equal(fs.labels[:, 1], (frame.converted == "yes").to_numpy(np.float32))


VARIANTS = [("dlrm", False), ("dlrm", True), ("dcnv2", False), ("logreg", False)]


@pytest.mark.parametrize(("arch", "wide"), VARIANTS, ids=[f"{a}{'+wide' if w else ''}" for a, w in VARIANTS])
def test_every_task_is_served_as_eager_pytorch_scores_it(arch: str, wide: bool, multi: dict[str, Any], messy_cfg: Any,
                                                         tmp_path: Path) -> None:
    from adsfm.contract.config import Precision
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.export.parity import check_parity, eager_probs
    from adsfm.serving.engine import DenseGraphEngine

    fs = multi["fs"]
    model = _model(fs, messy_cfg, arch, wide)
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    manifest = write_dense_bundle(fs, tmp_path, tables, model.dense, {n: Precision.fp32 for n, _ in tables},
                                  tables[0][1].shape[1], messy_cfg.export.opset, {}, arch=arch)
    assert manifest.features.tasks == ["click", "convert"]
    eager = eager_probs(model, fs, fs.holdout_idx)
    assert eager.shape == (len(fs.holdout_idx), 2)
    p, probs = check_parity(eager, DenseGraphEngine(tmp_path), fs, fs.holdout_idx, 1e-5)
    assert p.passed and p.max_abs_diff <= 1e-5, p.summary()
    assert probs.shape == eager.shape and not np.allclose(probs[:, 0], probs[:, 1])  # two heads, two answers
    broken = eager.copy()
    broken[:, 1] += 1e-3  # parity must look at the second task too
    assert not check_parity(broken, DenseGraphEngine(tmp_path), fs, fs.holdout_idx, 1e-5)[0].passed


def test_the_loss_is_the_weighted_sum_of_the_tasks_log_losses(multi: dict[str, Any], messy_cfg: Any) -> None:
    from adsfm.training.loop import train_step

    fs = multi["fs"]
    batch = fs.take(fs.train_idx[:64])
    model = _model(fs, messy_cfg, "dlrm").train()
    with torch.no_grad():
        logits = model(batch.dense_features, batch.sparse_features)
    bce = [torch.nn.functional.binary_cross_entropy_with_logits(logits[:, t].double(), batch.labels[:, t].double()) for t in (0, 1)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert train_step(model, opt, batch, torch.tensor([1.0, 0.5])) == pytest.approx(float(bce[0] + 0.5 * bce[1]), rel=1e-5)

    head = model.dense.over_arch.model[-1]  # the last Linear: one output row per task
    before = head.weight.detach().clone(), head.bias.detach().clone()
    train_step(model, opt, batch, torch.tensor([1.0, 0.0]))  # SGD: a task of weight 0 gets no gradient
    assert torch.equal(head.weight[1], before[0][1]) and torch.equal(head.bias[1], before[1][1])
    assert not torch.equal(head.weight[0], before[0][0])


def test_holdout_metrics_are_reported_per_task(multi: dict[str, Any], messy_cfg: Any) -> None:
    from adsfm.training.loop import evaluate
    from adsfm.training.metrics import ranking_metrics

    fs = multi["fs"]
    model = _model(fs, messy_cfg, "dlrm")
    m = evaluate(model, fs, fs.holdout_idx, 64, [1.0, 0.5])
    probs = torch.sigmoid(model(fs.take(fs.holdout_idx).dense_features, fs.take(fs.holdout_idx).sparse_features)).detach()
    for t, name in enumerate(["click", "convert"]):
        want = ranking_metrics(probs[:, t], torch.from_numpy(fs.labels[fs.holdout_idx, t]))
        for k in ("auc", "logloss", "ne", "calibration"):
            assert m[f"{name}_{k}"] == pytest.approx(want[k], rel=1e-5)
    assert m["auc"] == m["click_auc"] and m["loss"] == pytest.approx(m["click_logloss"] + 0.5 * m["convert_logloss"])


def test_a_response_carries_every_task_and_ranks_by_the_configured_combination(multi: dict[str, Any], messy_cfg: Any,
                                                                               tmp_path: Path) -> None:
    from adsfm.contract.config import Precision
    from adsfm.contract.request import RankRequest
    from adsfm.export.bundle import write_dense_bundle
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.serving.service import RankService

    fs = multi["fs"]
    model = _model(fs, messy_cfg, "dlrm")
    tables = [(c.name, model.sparse.embedding_bags[c.name].weight.detach()) for c in model.sparse.embedding_bag_configs()]
    write_dense_bundle(fs, tmp_path, tables, model.dense, {n: Precision.fp32 for n, _ in tables}, messy_cfg.model.embedding_dim,
                       messy_cfg.export.opset, {})
    engine = DenseGraphEngine(tmp_path)
    req = RankRequest(user={"user": "u3", "country": "fr", "age": 30}, candidates=[{"ad": str(i)} for i in range(20)])
    probs = engine.score(req.user, req.candidates)
    for rank_by, combine in [(None, lambda p: p[:, 0]), ("p_click * p_convert", lambda p: p[:, 0] * p[:, 1]),
                             ("0.2 * p_click + 0.8 * p_convert", lambda p: 0.2 * p[:, 0] + 0.8 * p[:, 1])]:
        res = RankService(engine, "m", "1", max_candidates=50, rank_by=rank_by).rank(req)
        assert res.rank_by == (rank_by or "p_click")
        want = combine(probs)
        for c in res.candidates:
            i = int(c["item"]["ad"])
            assert c["scores"] == pytest.approx({"click": probs[i, 0], "convert": probs[i, 1]}, abs=1e-12)
            assert c["score"] == pytest.approx(want[i], abs=1e-12)
        assert [int(c["item"]["ad"]) for c in res.candidates] == np.argsort(-want, kind="stable").tolist()
    with pytest.raises(ValueError, match="unknown name 'p_like'"):  # the version refuses to load
        RankService(engine, "m", "1", max_candidates=50, rank_by="p_like * p_love")


@pytest.mark.parametrize("expression,error", [
    ("p_click * p_buy", "unknown name 'p_buy'"),
    ("__import__('os').system('true')", "is not allowed"),
    ("p_click.real", "is not allowed"),
    ("p_click if p_convert else 1", "is not allowed"),
    ("p_click *", "is not an expression"),
])
def test_rank_by_refuses_anything_but_arithmetic_on_the_tasks(expression: str, error: str) -> None:
    from adsfm.contract.tasks import RankBy

    with pytest.raises(ValueError, match="serve.rank_by") as e:
        RankBy(expression, ["click", "convert"])
    assert error in str(e.value)


def test_rank_by_arithmetic() -> None:
    from adsfm.contract.tasks import RankBy

    p = np.array([[0.5, 0.2], [0.1, 0.9]])
    np.testing.assert_allclose(RankBy("-(p_a - 1) ** 2 / 2 + 3", ["a", "b"])(p), -((p[:, 0] - 1) ** 2) / 2 + 3)
    np.testing.assert_allclose(RankBy("1", ["a", "b"])(p), [1.0, 1.0])  # a constant still scores every row


@pytest.mark.parametrize("labels,error", [
    ([{"name": "click", "positive": "yes"}], "two or more"),
    ([{"name": "click", "positive": "yes"}, {"name": "click", "positive": "no"}], "repeat"),
    ([{"name": "click-through", "positive": "yes"}, {"name": "b", "positive": "no"}], "not identifiers"),
    ([{"name": "a", "positive": "yes", "weight": 0}, {"name": "b", "positive": "no", "weight": 0}], "one of them > 0"),
    ([{"name": "a", "column": "nope"}, {"name": "b", "positive": "no"}], "'nope' is not a column"),
])
def test_bad_task_config_fails_before_any_worker_starts(labels: list[dict[str, Any]], error: str, messy_cfg: Any) -> None:
    from adsfm.contract.config import DataConfig, as_config, to_plain, typed
    from adsfm.training.job import validate

    cfg = as_config(to_plain(messy_cfg))
    cfg.data = typed(DataConfig, {**to_plain(messy_cfg.data), "labels": labels})
    with pytest.raises(ValueError, match="data.labels") as e:
        validate(cfg)
    assert error in str(e.value)


def test_hstu_refuses_several_tasks(multi: dict[str, Any], messy_cfg: Any) -> None:
    from adsfm.contract.config import ModelConfig, typed
    from adsfm.training.models import build_model

    with pytest.raises(ValueError, match="model=hstu scores one task"):
        build_model(multi["fs"].spec, typed(ModelConfig, {"arch": "hstu"}), device="meta")
