"""Managed collision: TorchRec's MCH module admits and evicts ids, the remap is the feature contract's on
every path (training's batches, the bundle's featurizer, a delta's keys), and it survives a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from adsfm.contract.features import (
    OOV_ROW,
    FeatureSpec,
    Featurizer,
    SparseFeatureSpec,
    managed_id,
    managed_table,
)
from adsfm.training.managed import ManagedIds, reset_rows


def _spec(size: int, eviction: str = "lru", missing: bool = False) -> FeatureSpec:
    return FeatureSpec(sparse=[SparseFeatureSpec(name="ad", table="ad", side="item")],
                       tables={"ad": managed_table(size, "sum", missing, eviction, 1)})


def _kjt(keys: list[str]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["ad"], values=torch.tensor([managed_id(k) for k in keys]),
                                               lengths=torch.ones(len(keys), dtype=torch.int32))


def _held(m: ManagedIds) -> set[int]:
    return {int(k) for k in m.slot_keys("ad") if k >= 0}


def test_lru_keeps_the_recent_ids_and_the_new_id_takes_a_zeroed_row() -> None:
    m = ManagedIds(_spec(4, "lru"))  # 4 rows, 3 ids: torchrec keeps the last slot as its free-row mark
    first = [int(m.remap(_kjt([k]), train=True).values()[0]) for k in ["a", "b", "c"]]
    assert len(set(first)) == 3 and all(1 <= r <= 4 for r in first)
    m.remap(_kjt(["a"]), train=True)  # a seen again: b is the least recent
    m.evicted()
    weight = torch.ones(5, 3)
    rows = m.remap(_kjt(["e"]), train=True).values()
    assert _held(m) == {managed_id("a"), managed_id("c"), managed_id("e")} and rows.tolist() == [first[1]]
    evicted = m.evicted()
    assert evicted["ad"].tolist() == rows.tolist()  # e took the row it was looked up in, the one evicted
    reset_rows({"ad": (weight, 0)}, evicted)
    assert weight[rows].abs().sum() == 0 and weight.sum() == 12  # only that row starts afresh
    # Ids nobody holds take the unknown row; an eval batch admits nothing.
    assert m.remap(_kjt(["zzz"])).values().tolist() == [OOV_ROW] and managed_id("zzz") not in _held(m)


def test_lfu_keeps_the_frequent_ids() -> None:
    m = ManagedIds(_spec(2, "lfu"))
    for _ in range(3):
        m.remap(_kjt(["hot", "warm", "hot"]), train=True)
    for k in ["cold1", "cold2", "cold3"]:
        m.remap(_kjt([k]), train=True)
    assert managed_id("hot") in _held(m)


def test_the_featurizer_looks_ids_up_as_training_did_and_follows_moves() -> None:
    m = ManagedIds(_spec(8, missing=True))
    keys = [f"ad{i}" for i in range(12)]
    m.remap(_kjt(keys), train=True)
    spec = m.spec_with_slots()
    fz = Featurizer(spec)
    f = spec.sparse[0]
    ids = torch.tensor([managed_id(k) for k in [*keys, "never"]] + [1])  # 1: the missing row stays itself
    want = m.rows("ad", ids).tolist()
    got = [int(fz.rows(f, k, "ad")[0]) for k in [*keys, "never"]] + [int(fz.rows(f, None, "ad")[0])]
    assert got == want and want[-1] == 1 and want[-2] == OOV_ROW and set(want[:-2]) - {OOV_ROW}
    assert Featurizer(spec, ids=True).rows(f, "ad3", "ad").tolist() == [managed_id("ad3")]
    # A delta moves row r from its id to a new one: the old id falls back to the unknown row.
    old = next(k for k, row in zip(keys, want, strict=False) if row != OOV_ROW)
    r = int(fz.rows(f, old, "ad")[0])
    fz.update_slots("ad", np.array([0, r]), np.array([-1, managed_id("fresh")]))
    assert fz.rows(f, "fresh", "ad").tolist() == [r] and fz.rows(f, old, "ad").tolist() == [OOV_ROW]
    assert fz.slot_keys("ad")[r - spec.tables["ad"].first] == managed_id("fresh")
    # A ManagedIds started from an exported spec holds the same remap.
    assert np.array_equal(ManagedIds(spec).slot_keys("ad"), m.slot_keys("ad"))


def test_the_remap_survives_a_checkpoint(tmp_path: Path) -> None:
    from adsfm.training.checkpoint import checkpoint_holds, load_checkpoint, load_managed, save_checkpoint

    m = ManagedIds(_spec(4, "lfu"))
    for k in ["a", "b", "a", "c", "d", "e", "a"]:
        m.remap(_kjt([k]), train=True)
    model = torch.nn.Linear(2, 1)
    ckpt = save_checkpoint(model, tmp_path / "step_1", managed=m)
    assert checkpoint_holds(ckpt, "managed") and not checkpoint_holds(ckpt, "optim")
    back = ManagedIds(_spec(4, "lfu"))
    load_checkpoint(torch.nn.Linear(2, 1), ckpt, managed=back)
    assert np.array_equal(back.slot_keys("ad"), m.slot_keys("ad"))
    for name, buf in m.state_dict().items():  # the eviction's counts too: a resumed run evicts as this one would
        assert torch.equal(buf, back.state_dict()[name]), name
    again = ManagedIds(_spec(4, "lfu"))
    load_managed(again, ckpt)
    assert np.array_equal(again.slot_keys("ad"), m.slot_keys("ad"))


def test_a_managed_bundle_scores_raw_rows_as_training_did(messy_cfg: Any, tmp_path: Path) -> None:
    """Messy rows (missing ids, a multi-valued feature sharing the table) trained with a managed table too
    small for its ids, exported: parity compares the eager model on training's remapped batches with the
    bundle featurizing the raw rows, and fails on one differing row."""
    import copy

    from omegaconf import open_dict

    from adsfm.export.bundle import export_bundle
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local

    cfg = copy.deepcopy(messy_cfg)
    with open_dict(cfg.model.tables):  # as `+model.tables.ad={collision:managed,size:6}` does
        cfg.model.tables["ad"] = {"collision": "managed", "size": 6, "eviction": "lru"}
    fs = load_features(cfg.data, cfg.model.tables)
    assert fs.managed and fs.spec.tables["ad"].managed == 6
    model = train_local(cfg, fs)
    held = fs.managed.slot_keys("ad")
    assert (held >= 0).sum() == 5  # more ids than rows: the table filled (size - 1 ids)
    manifest = export_bundle(cfg, save_checkpoint(model, tmp_path / "step_1", managed=fs.managed), tmp_path / "bundle")
    assert manifest.parity is not None and manifest.parity.passed and manifest.parity.featurization == "identical"
    assert manifest.features.tables["ad"].slot_keys == held.tolist()
    _a_moved_id_invalidates_what_the_unknown_row_pooled(tmp_path / "bundle")


def _a_moved_id_invalidates_what_the_unknown_row_pooled(bundle: Path) -> None:
    """A replica cached a user state pooled from the unknown row (an id no row held); a delta then gives
    that id a row: the next request pools the new row, as a replica that never cached the state does."""
    from adsfm.serving.engine import DenseGraphEngine

    warm, cold = DenseGraphEngine(bundle), DenseGraphEngine(bundle)
    table = warm.manifest.features.tables["ad"]
    slots = warm.featurizer.slot_keys("ad")
    unheld = next(str(i) for i in range(10_000) if managed_id(str(i)) not in set(slots.tolist()))
    user, items = {"recent_ads": [unheld]}, [{"ad": k} for k in list(warm.item_store)[:8]]
    before = warm.score(user, items)  # its user state, pooled from the unknown row, now cached
    row = table.first + int(np.flatnonzero(slots >= 0)[0])  # a held id's row goes to the unheld id
    weight = np.random.default_rng(0).normal(size=(1, warm.manifest.tables["ad"].dim)).astype(np.float32)
    for engine in (warm, cold):
        engine.apply_delta(1, 0.0, {"ad": {"rows": np.array([row]), "keys": np.array([managed_id(unheld)]), "weight": weight.copy()}})
    after = warm.score(user, items)
    np.testing.assert_allclose(after, cold.score(user, items), rtol=0, atol=1e-6)
    assert np.abs(after - before).max() > 1e-6, "the id's new row did not change its user's scores"


@pytest.mark.parametrize(("tables", "match"), [
    ({"nope": {"collision": "managed", "size": 8}}, r"model.tables.nope: no such table; data.sparse's tables are \["),
    ({"ad": {"collision": "managed"}}, r"model.tables.ad.size\(0\): collision=managed needs the table.s rows"),
    ({"ad": {"collison": "managed"}}, r"model.tables.ad: .*collison.*\(fields: collision, size"),
    ({"ad": {"collision": "fancy"}}, r"model.tables.ad: .*fancy"),
])
def test_bad_table_configs_name_the_table(messy_cfg: Any, tables: dict[str, Any], match: str) -> None:
    from adsfm.training.data import load_features

    with pytest.raises(ValueError, match=match):
        load_features(messy_cfg.data, tables)


def test_a_streamed_source_cannot_manage_its_tables() -> None:
    from adsfm.contract.config import as_config, compose
    from adsfm.training.data import check_collisions

    cfg = as_config(compose(["experiment=criteo_dlrm"]))
    with pytest.raises(ValueError, match="collision=managed: remaps in-memory sources"):
        check_collisions(cfg.data, {cfg.data.sparse[0].name if cfg.data.sparse else "cat_0": {"collision": "managed", "size": 8}})


def test_a_managed_item_table_exports_an_hstu_split_bundle(tmp_path: Path) -> None:
    """HSTU reads histories row by row (FeatureSet.row_values) for its split parity: the managed item
    table's ids become rows there too, and the split bundle featurizes raw histories identically."""
    from adsfm.contract.config import as_config, compose
    from adsfm.export.bundle import export_bundle
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local

    cfg = as_config(compose([f"run_root={tmp_path}", "experiment=synthetic_hstu", "train.progress=false",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.users=16", "data.synthetic.events_per_user=200",
                             "data.synthetic.rows_per_user=10", "data.synthetic.rows=2000", "data.history.length=32",
                             "export.parity_rows=64", "+model.tables.item={collision:managed,size:128,eviction:lfu}"]))
    fs = load_features(cfg.data, cfg.model.tables)
    assert fs.managed and fs.sparse["history"][0].max() > fs.spec.tables["item"].rows  # ids until taken
    model = train_local(cfg, fs, max_steps=8)
    manifest = export_bundle(cfg, save_checkpoint(model, tmp_path / "step_1", managed=fs.managed), tmp_path / "bundle")
    assert manifest.parity is not None and manifest.parity.passed and manifest.parity.featurization == "identical"
    assert sum(k >= 0 for k in manifest.features.tables["item"].slot_keys) == 127
