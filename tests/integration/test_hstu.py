"""HSTU: history features without leakage, M-FALCON masking, and the split export against the joint forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def seq_cfg(run_root: Path) -> Any:
    from adsfm.contract.config import compose

    return compose(["experiment=movielens_hstu", f"run_root={run_root}", "parallel=single", "train.progress=false"])


@pytest.fixture(scope="module")
def seq_features(seq_cfg: Any) -> Any:
    from adsfm.training.data import load_features

    return load_features(seq_cfg.data)


@pytest.fixture(scope="module")
def model(seq_cfg: Any, seq_features: Any) -> Any:
    """A randomly initialised HSTU whose relative biases are non-zero (they start at zero in training)."""
    from adsfm.training.models.hstu import HSTU

    torch.manual_seed(0)
    m = HSTU(seq_features.spec, seq_cfg.model, device="cpu").eval()
    with torch.no_grad():
        for layer in m.dense.blocks():
            layer.position_bias.normal_()
            layer.time_bias.normal_()
    return m


def _rows(fs: Any, row: int, name: str) -> np.ndarray:
    return fs.row_values(row, name)


def _tokens(table: Any) -> list[str]:
    """Row → raw key of a vocabulary table (the reserved rows first)."""
    return ["<oov>", *(["<missing>"] if table.missing else []), *table.vocab]


def test_history_is_strictly_earlier_and_in_step(seq_cfg: Any, seq_features: Any) -> None:
    """Each row's history: the user's latest events with earlier timestamps, oldest first; the ratings and
    times are those events' own (checked against the raw MovieLens ratings)."""
    from adsfm.training.data import load_movielens_frame

    fs = seq_features
    raw = load_movielens_frame(Path(seq_cfg.data.cache_dir).expanduser())
    vocab = _tokens(fs.spec.tables["item"])
    rng = np.random.default_rng(0)
    checked = 0
    for r in rng.choice(len(fs.labels), 300, replace=False):
        t = int(_rows(fs, r, "timestamp")[0])
        times = _rows(fs, r, "history_time")
        items = [vocab[i] for i in _rows(fs, r, "history")]
        ratings = _rows(fs, r, "history_rating")
        assert (times < t).all(), "history must be strictly earlier than the event"
        assert (np.diff(times) >= 0).all(), "history must be oldest first"
        uid = fs.users[r]
        mine = raw[(raw.user_id == uid) & (raw.timestamp.astype(np.int64) < t)]
        latest = mine.sort_values("timestamp", kind="stable").tail(seq_cfg.data.history.length)
        # Ties at the cut may pick either event; the times kept are the latest ones either way.
        assert sorted(times) == sorted(latest.timestamp.astype(np.int64))
        rating_vocab = _tokens(fs.spec.tables["rating"])
        by_item = dict(zip(mine.item_id.astype(str), mine.rating, strict=True))
        known = [(i, a) for i, a in zip(items, ratings, strict=True) if i != "<oov>"]  # items only in holdout rows
        assert {i for i, _ in known} <= set(by_item)
        assert all(float(rating_vocab[a]) == by_item[i] for i, a in known)
        checked += len(items)
    assert checked > 1000


def _one_user(model: Any, fs: Any, row: int, m: int, seed: int) -> tuple[Any, ...]:
    s = model.seq
    g = torch.Generator().manual_seed(seed)
    hist = torch.from_numpy(_rows(fs, row, s.history))
    acts = torch.from_numpy(_rows(fs, row, s.actions))
    times = torch.from_numpy(_rows(fs, row, s.times))
    ctx = {f: int(_rows(fs, row, f)[0]) for f in model.context_features}
    cands = {f: torch.randint(0, model.table_of(f).shape[0], (m,), generator=g) for f in model.item_features}
    return hist, acts, times, ctx, cands, int(_rows(fs, row, s.time)[0])


@torch.no_grad()
def test_candidates_see_history_not_each_other(model: Any, seq_features: Any) -> None:
    """One forward over m candidates = m forwards of one candidate each (M-FALCON masking), and a
    candidate's score does not depend on its place in the list."""
    row = int(np.argmax(seq_features.sparse["history"][1]))  # a long history
    hist, acts, times, ctx, cands, t = _one_user(model, seq_features, row, 12, seed=1)
    joint = model.score(hist, acts, times, ctx, cands, t)
    alone = torch.stack([model.score(hist, acts, times, ctx, {f: v[j : j + 1] for f, v in cands.items()}, t)[0]
                         for j in range(12)])
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    shuffled = model.score(hist, acts, times, ctx, {f: v[perm] for f, v in cands.items()}, t)
    torch.testing.assert_close(shuffled, joint[perm], rtol=0, atol=1e-5)
    # and the history does matter: dropping it changes the scores
    empty = model.score(hist[:0], acts[:0], times[:0], ctx, cands, t)
    assert (empty - joint).abs().max() > 1e-3


@torch.no_grad()
def test_training_forward_matches_single_user_scoring(model: Any, seq_features: Any) -> None:
    """The batched training forward (one candidate per row, jagged histories incl. empty ones) scores each
    row as the one-user path does."""
    fs = seq_features
    rows = np.concatenate([np.flatnonzero(fs.sparse["history"][1] == 0)[:3], np.arange(40, 80)])
    b = fs.take(rows)
    batched = model(b.dense_features, b.sparse_features)
    s = model.seq
    for k, r in enumerate(rows):
        hist, acts, times, ctx, _, t = _one_user(model, fs, int(r), 1, seed=0)
        item = {f: torch.from_numpy(_rows(fs, int(r), f)) for f in model.item_features}
        one = model.score(hist, acts, times, ctx, item, t)
        assert torch.allclose(batched[k], one[0], atol=1e-5), (k, s.history)


@pytest.fixture(scope="module")
def split_bundle(model: Any, seq_features: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adsfm.export.sequence import export_sequence_bundle

    out = tmp_path_factory.mktemp("hstu-bundle")
    tables = [c.name for c in model.sparse.embedding_configs()]
    export_sequence_bundle(model, seq_features, out, dict.fromkeys(tables, "fp32"), 18, {})
    return out


@pytest.mark.parametrize("history,candidates", [(0, 1), (0, 7), (1, 3), (37, 50), (50, 1)])
def test_split_graphs_match_the_joint_forward(model: Any, seq_features: Any, split_bundle: Path,
                                              history: int, candidates: int) -> None:
    """User graph + candidate graph (ONNX Runtime) against the eager joint forward, fp32: <= 1e-4."""
    from adsfm.serving.sequence import SequenceEngine, SequenceInputs

    fs = seq_features
    lengths = fs.sparse["history"][1]
    row = int(np.flatnonzero(lengths == history)[0]) if history else int(np.flatnonzero(lengths == 0)[0])
    hist, acts, times, ctx, cands, t = _one_user(model, fs, row, candidates, seed=history + candidates)
    with torch.no_grad():
        eager = torch.sigmoid(model.score(hist, acts, times, ctx, cands, t)).double().numpy()
    engine = SequenceEngine(split_bundle)
    state = engine.encode(hist.numpy(), acts.numpy(), times.numpy(), ctx, t)
    split = engine.run(SequenceInputs(engine.item_tokens({f: v.numpy() for f, v in cands.items()}), t, state))
    assert np.abs(split - eager).max() <= 1e-4


def test_raw_requests_score_like_featurized_rows(model: Any, seq_cfg: Any, seq_features: Any, split_bundle: Path) -> None:
    """A service's request (raw ids, ratings and times, oldest first) scores as the featurized row does;
    the second request of the same user hits the user-state cache; mismatched history fields are a 4xx-class
    FeatureError that names the field."""
    from adsfm.contract.features import FeatureError
    from adsfm.serving.sequence import SequenceEngine

    fs = seq_features
    row = int(np.argmax(fs.sparse["history"][1]))
    vocab = {t: _tokens(spec) for t, spec in fs.spec.tables.items()}
    table = {f.name: f.table for f in fs.spec.sparse}

    def raw(name: str) -> list[str]:
        return [vocab[table[name]][i] for i in _rows(fs, row, name)]

    user: dict[str, Any] = {f: raw(f)[0] for f in model.context_features}
    user.update(history=raw("history"), history_rating=raw("history_rating"),
                history_time=_rows(fs, row, "history_time").tolist(), timestamp=int(_rows(fs, row, "timestamp")[0]))
    items = [{"item_id": raw("item_id")[0]}, {"item_id": "1"}, {"item_id": "50"}]
    engine = SequenceEngine(split_bundle)
    got = engine.score(user, items)
    hist, acts, times, ctx, _, t = _one_user(model, fs, row, 1, seed=0)
    rows = {f: torch.from_numpy(v) for f, v in engine.item_rows(items).items()}
    with torch.no_grad():
        want = torch.sigmoid(model.score(hist, acts, times, ctx, rows, t)).double().numpy()
    assert np.abs(got - want).max() <= 1e-4
    engine.score(user, items[:1])
    assert engine.user_cache_info().hits == 1
    bad = dict(user, history_rating=user["history_rating"][:-1])
    with pytest.raises(FeatureError) as e:
        engine.score(bad, items)
    assert e.value.field == "user.history"
