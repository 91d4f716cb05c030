"""N ranks on gloo train exactly like one process on the same global batches (the design's quality bar).

The reference is independent of the sharded path: a plain unsharded model with unfused torch optimisers.
Both start from the same weights and see the same 20 global batches; each rank takes its slice. Every
layout is checked under plain SGD on tables and dense layers: Adagrad and Adam are invariant to a constant
factor on every gradient, so only SGD sees a sum-versus-mean bug over ranks (a planted x2 on one rank's
gradient must fail the comparison: a test of the test). A few layouts are also checked under the fused
Adagrad / Adam they train with by default, whose optimizer state is sharded with the tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from tests.conftest import free_port

STEPS, BATCH = 20, 256
pytestmark = pytest.mark.distributed


def _batches(n_rows: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.choice(n_rows, size=BATCH, replace=False) for _ in range(STEPS)]


def _rank_setup(rank: int, world: int, port: int, cfg_yaml: str) -> tuple[Any, Any, Any, Any]:
    """Join the gloo group and build the layout's model as the Ray worker does: (cfg, features, model, optimizer)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from adsfm.contract.config import as_config
    from adsfm.parallel.shard import parallelize_model
    from adsfm.training.data import load_features
    from adsfm.training.models import build_model
    from adsfm.training.worker import optim_config

    cfg = as_config(OmegaConf.create(cfg_yaml))
    fs = load_features(cfg.data, cfg.model.tables)
    dmp, opt, _ = parallelize_model(build_model(fs.spec, cfg.model, device="meta"), cfg.parallel, optim_config(cfg),  # type: ignore[arg-type]
                                    torch.device("cpu"))
    return cfg, fs, dmp, opt


def _rank_main(rank: int, world: int, port: int, cfg_yaml: str, init_path: str, out_dir: str, plant: bool = False) -> None:
    from adsfm.parallel.mesh import data_coords
    from adsfm.parallel.shard import load_full_state
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.loop import LossMeter, train_step
    from adsfm.training.managed import fresh_rows

    cfg, fs, dmp, opt = _rank_setup(rank, world, port, cfg_yaml)
    load_full_state(dmp, torch.load(init_path))
    if plant and rank == 1:  # the bug the SGD check exists for: one rank's dense gradient doubled
        for p in dmp.module.dense.parameters():
            p.register_hook(lambda g: g * 2)
    c = data_coords()  # tensor-parallel peers take the same rows
    local = BATCH // c.dp
    meter = LossMeter()
    # managed tables: each rank's ids are profiled with every other rank's, so all hold one remap
    batches = fresh_rows((fs.take(rows[c.dp_rank * local : (c.dp_rank + 1) * local], train=True) for rows in _batches(fs.train_idx)),
                         fs.managed, dmp)
    if cfg.train.pipeline == "sparse_dist":  # TorchRec's TrainPipelineSparseDist drives the same batches
        from adsfm.training.pipeline import sparse_dist_steps

        steps = sparse_dist_steps(dmp, opt, batches)
    else:
        steps = (train_step(dmp, opt, b) for b in batches)
    for loss in steps:
        meter.add(loss)
    losses = meter.flush()
    save_checkpoint(dmp, Path(out_dir) / "ckpt", opt, managed=fs.managed)
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))
        dense = dmp.module.dense
        w = dense.over_arch.model[0]._mlp[0]._linear.weight if hasattr(dense, "over_arch") else dense.layers[0].q.weight
        layout = {"type": type(w).__name__, "local_shape": list(getattr(w, "to_local", lambda: w)().shape)}
        if hasattr(w, "placements"):
            layout.update(placements=[str(p) for p in w.placements], mesh=list(w.device_mesh.mesh_dim_names or []))
        (Path(out_dir) / "layout.json").write_text(json.dumps(layout))
    dist.barrier()
    # Skip gloo's teardown: a peer that exits first can make the other's destructor abort (SIGABRT).
    os._exit(0)


def _optim(sparse_optimizer: str, dense_optimizer: str) -> list[str]:
    """Overrides for an optimizer pair; SGD's steps are larger than the adaptive optimizers' so that 20
    steps move the weights well past the comparison's tolerance."""
    lr = ["train.dense_lr=0.05"] if dense_optimizer == "sgd" else []
    lr += ["train.sparse_lr=0.5"] if sparse_optimizer == "sgd" else []
    return [f"train.sparse_optimizer={sparse_optimizer}", f"train.dense_optimizer={dense_optimizer}", *lr]


def _reference(features: Any, init: Path, sparse_optimizer: str, dense_optimizer: str) -> dict[str, Any]:
    from adsfm.contract.config import as_config, compose
    from adsfm.parallel.shard import unsharded_optimizer
    from adsfm.training.loop import train_step
    from adsfm.training.models.pooled import PooledRanker
    from adsfm.training.worker import optim_config

    cfg = as_config(compose(["parallel=single", *_optim(sparse_optimizer, dense_optimizer)]))
    model = PooledRanker(features.spec, cfg.model, device="cpu")
    model.load_state_dict(torch.load(init))
    opt = unsharded_optimizer(model, optim_config(cfg))
    losses = [train_step(model, opt, features.take(rows)) for rows in _batches(features.train_idx)]
    return {"init": init, "losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def references(small_cfg: Any, features: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The unsharded model trained with a given sparse optimizer, from one shared initialisation."""
    from adsfm.training.models.pooled import PooledRanker

    torch.manual_seed(123)
    init = tmp_path_factory.mktemp("init") / "init.pt"
    torch.save(PooledRanker(features.spec, small_cfg.model, device="cpu").state_dict(), init)
    memo: dict[tuple[str, str], dict[str, Any]] = {}

    def get(sparse_optimizer: str = "rowwise_adagrad", dense_optimizer: str = "adam") -> dict[str, Any]:
        key = (sparse_optimizer, dense_optimizer)
        if key not in memo:
            memo[key] = _reference(features, init, *key)
        return memo[key]

    return get


@pytest.fixture(scope="module")
def reference(references: Any) -> dict[str, Any]:
    return references()  # type: ignore[no-any-return]


DLRM_LAYOUTS = ["single", "tw2", "rw2", "twrw2", "cw2", "twcw2", "dp2", "fsdp2", "dp2tp2", "sparse2x2"]
LAYOUTS = [*((layout, "sgd", "sgd") for layout in DLRM_LAYOUTS),
           # the default optimizers, whose state is sharded with the tables (column shards need element-wise
           # Adagrad) and with the dense layers (FSDP, TP)
           ("tw2", "rowwise_adagrad", "adam"), ("cw2", "adagrad", "adam"), ("fsdp2", "rowwise_adagrad", "adam"),
           ("dp2tp2", "rowwise_adagrad", "adam")]


def _train_layout(layout: str, optim: tuple[str, str], small_cfg: Any, reference: dict[str, Any], tmp_path: Path,
                  plant: bool = False, extra: tuple[str, ...] = ()) -> Any:
    from adsfm.contract.config import as_config, compose
    from adsfm.training.job import validate

    cfg = as_config(compose([f"run_root={tmp_path}", f"parallel={layout}", f"train.batch_size={BATCH}", *_optim(*optim), *extra]))
    cfg.data = small_cfg.data
    validate(cfg)
    world = cfg.parallel.num_workers
    mp.start_processes(
        _rank_main,
        args=(world, free_port(), OmegaConf.to_yaml(cfg), str(reference["init"]), str(tmp_path), plant),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return cfg


def _compare(layout: str, cfg: Any, features: Any, reference: dict[str, Any], tmp_path: Path) -> float:
    """Losses within 1e-4 at every step and every parameter within tolerance (1e-5 under SGD); returns the
    largest parameter difference."""
    from adsfm.training.checkpoint import load_into_unsharded
    from adsfm.training.models.pooled import PooledRanker

    losses = json.loads((tmp_path / "losses.json").read_text())
    ref = reference["losses"]
    diffs = np.abs(np.array(losses) - np.array(ref))
    assert diffs.max() <= 1e-4, f"{layout}: per-step loss diffs {diffs.round(6).tolist()}"
    assert ref[-1] < ref[0]  # the reference did learn, so equal losses are not equal non-training
    gathered = PooledRanker(features.spec, cfg.model, device="cpu")
    load_into_unsharded(gathered, tmp_path / "ckpt")
    # SGD's parameters agree to float summation order (within 3e-7 here); adaptive optimizers amplify that
    # noise on rows whose gradients are near zero, so they get a looser bound.
    sgd = cfg.train.sparse_optimizer == "sgd" and cfg.train.dense_optimizer == "sgd"
    atol, rtol = (1e-5, 0.0) if sgd else (1e-4, 1e-3)
    worst = 0.0
    for k, want in reference["state"].items():
        got = gathered.state_dict()[k]
        worst = max(worst, float((got - want).abs().max()))
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, k=k: f"{layout} {k}: {m}")
    print(f"{layout} {cfg.train.sparse_optimizer}/{cfg.train.dense_optimizer}: max |loss diff| over {STEPS} steps "
          f"{diffs.max():.2e}, max |parameter diff| {worst:.2e} (loss {ref[0]:.4f} -> {ref[-1]:.4f})")
    return worst


@pytest.mark.parametrize("layout,sparse_optimizer,dense_optimizer", LAYOUTS)
def test_sharded_training_matches_single_process(
    layout: str, sparse_optimizer: str, dense_optimizer: str, small_cfg: Any, features: Any, references: Any, tmp_path: Path
) -> None:
    reference = references(sparse_optimizer, dense_optimizer)
    cfg = _train_layout(layout, (sparse_optimizer, dense_optimizer), small_cfg, reference, tmp_path)
    # The dense layout is what the config asked for (so equal losses are not the replicated model's).
    top = json.loads((tmp_path / "layout.json").read_text())
    world = cfg.parallel.num_workers
    full = [cfg.model.over_arch[0], reference["state"]["dense.over_arch.model.0._mlp.0._linear.weight"].shape[1]]
    if cfg.parallel.data_parallel == "fsdp":
        assert top["type"] == "DTensor" and top["placements"][0].lstrip("_").startswith("S(0"), top
        if cfg.parallel.tp > 1:  # FSDP over dp composed with the column-wise split over tp
            assert top["mesh"] == ["dp", "tp"] and top["placements"][1] == "S(0)", top
        assert top["local_shape"] == [full[0] // world, full[1]], top  # sharded over dp (FSDP) and tp
    else:
        assert top["local_shape"] == full
    _compare(layout, cfg, features, reference, tmp_path)


def test_a_planted_gradient_scale_bug_fails_the_sgd_check(small_cfg: Any, features: Any, references: Any, tmp_path: Path) -> None:
    """A test of the test: dp2 with rank 1's dense gradients doubled before DDP averages them must not
    pass the comparison that every layout passes."""
    reference = references("sgd", "sgd")
    cfg = _train_layout("dp2", ("sgd", "sgd"), small_cfg, reference, tmp_path, plant=True)
    with pytest.raises(AssertionError) as caught:
        _compare("dp2 with x2 planted", cfg, features, reference, tmp_path)
    print(f"planted x2 on rank 1's dense gradients: the SGD check failed as intended: {str(caught.value).splitlines()[0][:160]}")


MANAGED = ("+model.tables.item={collision:managed,size:1024,eviction:lru}",
           "+model.tables.user_id={collision:managed,size:512,eviction:lfu}")


def test_managed_tables_train_on_two_ranks_as_on_one(small_cfg: Any, tmp_path: Path) -> None:
    """Item and user tables too small for their ids, managed, row-wise over 2 ranks: the remap (every rank
    profiling all ranks' ids), the rows new ids take (zeroed in whichever shard holds them) and the
    weights match one process taking the global batches."""
    from adsfm.contract.config import as_config, compose
    from adsfm.parallel.shard import unsharded_optimizer
    from adsfm.training.checkpoint import load_managed
    from adsfm.training.data import load_features
    from adsfm.training.loop import train_step
    from adsfm.training.managed import ManagedIds, fresh_rows
    from adsfm.training.models.pooled import PooledRanker
    from adsfm.training.worker import optim_config

    cfg1 = as_config(compose(["parallel=single", *_optim("sgd", "sgd"), *MANAGED]))
    cfg1.data = small_cfg.data
    fs = load_features(cfg1.data, cfg1.model.tables)
    torch.manual_seed(123)
    model = PooledRanker(fs.spec, cfg1.model, device="cpu")
    init = tmp_path / "init.pt"
    torch.save(model.state_dict(), init)
    opt = unsharded_optimizer(model, optim_config(cfg1))
    batches = fresh_rows((fs.take(rows, train=True) for rows in _batches(fs.train_idx)), fs.managed, model)
    reference = {"init": init, "losses": [train_step(model, opt, b) for b in batches],
                 "state": {k: v.clone() for k, v in model.state_dict().items()}}
    assert fs.managed and fs.managed.evicted() == {} and (fs.managed.slot_keys("item") >= 0).sum() == 1023
    ref_slots = {t: fs.managed.slot_keys(t) for t in ("item", "user_id")}
    cfg = _train_layout("rw2", ("sgd", "sgd"), small_cfg, reference, tmp_path, extra=MANAGED)
    _compare("rw2 managed", cfg, fs, reference, tmp_path)
    ranks = ManagedIds(fs.spec)
    load_managed(ranks, tmp_path / "ckpt")
    for t, want in ref_slots.items():
        assert np.array_equal(ranks.slot_keys(t), want), t


def _rank_reload(rank: int, world: int, port: int, cfg_yaml: str, ckpt: str, out_dir: str) -> None:
    """Load `ckpt` (written under another layout) into this layout, evaluate the holdout, save again."""
    from adsfm.training.checkpoint import load_checkpoint, save_checkpoint
    from adsfm.training.loop import evaluate

    _, fs, dmp, opt = _rank_setup(rank, world, port, cfg_yaml)
    opt.init_state()
    load_checkpoint(dmp, Path(ckpt), opt)
    metrics = evaluate(dmp, fs, fs.holdout_idx, 4096)
    save_checkpoint(dmp, Path(out_dir) / "ckpt", opt)
    if rank == 0:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
    dist.barrier()
    os._exit(0)


def _spawn(fn: Any, layout: str, small_cfg: Any, out: Path, *args: str) -> dict[str, Any]:
    from adsfm.contract.config import as_config, compose

    # Element-wise Adagrad: its state reshards between row and column shards (row-wise Adagrad's cannot
    # be split by columns, see parallel.config.validate_parallel).
    cfg = as_config(compose([f"run_root={out}", f"parallel={layout}", f"train.batch_size={BATCH}", "train.sparse_optimizer=adagrad"]))
    cfg.data = small_cfg.data
    world = cfg.parallel.num_workers
    mp.start_processes(fn, args=(world, free_port(), OmegaConf.to_yaml(cfg), *args, str(out)), nprocs=world, join=True, start_method="spawn")
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}


def test_checkpoints_reshard_across_layouts(small_cfg: Any, features: Any, reference: dict[str, Any], tmp_path: Path) -> None:
    """tw2 → single and tw2 → cw2 → rw2 (optimizer state included): the same holdout loss as the
    checkpoint's weights gathered into a plain model, within 1e-5."""
    from adsfm.training.checkpoint import load_into_unsharded
    from adsfm.training.loop import evaluate
    from adsfm.training.models.pooled import PooledRanker

    _spawn(_rank_main, "tw2", small_cfg, tmp_path / "tw2", str(reference["init"]))
    source = tmp_path / "tw2" / "ckpt"
    plain = PooledRanker(features.spec, small_cfg.model, device="cpu")
    load_into_unsharded(plain, source)
    want = evaluate(plain.eval(), features, features.holdout_idx, 4096)["logloss"]

    single = _spawn(_rank_reload, "single", small_cfg, tmp_path / "single", str(source))
    cw2 = _spawn(_rank_reload, "cw2", small_cfg, tmp_path / "cw2", str(source))
    rw2 = _spawn(_rank_reload, "rw2", small_cfg, tmp_path / "rw2", str(tmp_path / "cw2" / "ckpt"))
    print(f"holdout logloss: gathered {want:.6f}, single {single['logloss']:.6f}, cw2 {cw2['logloss']:.6f}, rw2 {rw2['logloss']:.6f}")
    for name, got in (("single", single), ("cw2", cw2), ("rw2", rw2)):
        assert abs(got["logloss"] - want) <= 1e-5, f"{name}: {got['logloss']} != {want}"
    for layout in ("tw2", "cw2", "rw2"):
        _export_reads_chunks_as_the_whole_table(tmp_path / layout / "ckpt", features, small_cfg, tmp_path / f"x-{layout}",
                                                sharded=layout == "rw2")


def _export_reads_chunks_as_the_whole_table(ckpt: Path, features: Any, cfg: Any, out: Path, sharded: bool) -> None:
    """Export reads a checkpoint's table a stored chunk at a time (row-wise: one per rank): the chunks are
    the table DCP loads whole, gathered rows are its rows, and the table files written chunk by chunk are
    byte for byte those written from the whole table."""
    from adsfm.export.sparse import StoredTable, export_table, load_table
    from adsfm.training.models.pooled import table_configs, table_dim

    out.mkdir()
    for c in table_configs(features.spec, table_dim(cfg.model)):
        key, shape = f"sparse.embedding_bags.{c.name}.weight", (c.num_embeddings, c.embedding_dim)
        whole, stored = load_table(ckpt, key, shape), StoredTable(ckpt, key, shape)
        chunks = list(stored.chunks())
        assert len(chunks) == (2 if sharded else 1), (ckpt, c.name, [f for f, _ in chunks])
        torch.testing.assert_close(torch.cat([w for _, w in chunks]), whole, atol=0, rtol=0)
        ids = torch.tensor([shape[0] - 1, 0, shape[0] // 2, 0])
        torch.testing.assert_close(stored.rows(ids), whole[ids], atol=0, rtol=0)
        for precision in ("fp32", "int8"):
            export_table(whole, precision, out / "a")
            export_table(stored, precision, out / "b")
            assert (out / "a").read_bytes() == (out / "b").read_bytes(), (ckpt, c.name, precision)


HSTU_LAYOUTS = [("tw2", []), ("tp2", ["parallel.dp=1", "parallel.tp=2", "parallel.data_parallel=fsdp"])]


@pytest.fixture(scope="module")
def hstu_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HSTU (dropout off: the ranks' dropout streams differ from one process's) trained in one process."""
    from adsfm.contract.config import as_config, compose
    from adsfm.parallel.shard import unsharded_optimizer
    from adsfm.training.data import load_features
    from adsfm.training.loop import train_step
    from adsfm.training.models import build_model
    from adsfm.training.worker import optim_config

    # SGD on the tables and the dense layers (which sees the gradient's scale). Row-wise Adagrad scales each
    # row's first update to about lr whatever the gradient's size, so rows whose gradient is near zero
    # (user rows reached through two LayerNorms) turn float summation-order noise into updates of up to
    # 0.013 (measured on 13% of the user_id table after 20 steps) while the losses still agree.
    overrides = ["experiment=movielens_hstu", "model.sequence.dropout=0", f"train.batch_size={BATCH}", *_optim("sgd", "sgd")]
    cfg = as_config(compose([*overrides, "parallel=single"]))
    fs = load_features(cfg.data)
    torch.manual_seed(321)
    model = build_model(fs.spec, cfg.model, device="cpu")
    with torch.no_grad():  # the relative biases start at zero; the layouts must also agree on their updates
        for layer in model.dense.blocks():  # type: ignore[union-attr, operator]
            layer.position_bias.normal_(0, 0.1)
            layer.time_bias.normal_(0, 0.1)
    init = tmp_path_factory.mktemp("hstu-init") / "init.pt"
    torch.save(model.state_dict(), init)
    opt = unsharded_optimizer(model, optim_config(cfg))  # type: ignore[arg-type]
    losses = [train_step(model, opt, fs.take(rows)) for rows in _batches(fs.train_idx)]
    return {"init": init, "losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "overrides": overrides, "spec": fs.spec}


@pytest.mark.parametrize("layout,extra", HSTU_LAYOUTS, ids=[n for n, _ in HSTU_LAYOUTS])
def test_hstu_layouts_match_single_process(layout: str, extra: list[str], hstu_reference: dict[str, Any], tmp_path: Path) -> None:
    """HSTU's sequence tables sharded table-wise (EmbeddingCollection), and its attention and MLP blocks
    tensor-parallel by head (Q, K, V, U column-wise, output row-wise; the head-shared bias summed over tp)."""
    from adsfm.contract.config import as_config, compose
    from adsfm.training.checkpoint import load_into_unsharded
    from adsfm.training.job import validate
    from adsfm.training.models import build_model

    ref = hstu_reference
    cfg = as_config(compose([f"run_root={tmp_path}", *ref["overrides"], "parallel=tw2", *extra]))
    validate(cfg)
    mp.start_processes(_rank_main, args=(2, free_port(), OmegaConf.to_yaml(cfg), str(ref["init"]), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    losses = json.loads((tmp_path / "losses.json").read_text())
    q = json.loads((tmp_path / "layout.json").read_text())
    if cfg.parallel.tp > 1:  # each rank holds half of the heads' query projection
        assert q["type"] == "DTensor" and q["local_shape"][0] == ref["state"]["dense.layers.0.q.weight"].shape[0] // 2, q
    diffs = np.abs(np.array(losses) - np.array(ref["losses"]))
    assert diffs.max() <= 1e-4, diffs.round(6).tolist()
    assert ref["losses"][-1] < ref["losses"][0]
    gathered = build_model(ref["spec"], cfg.model, device="cpu")
    load_into_unsharded(gathered, tmp_path / "ckpt")
    worst = 0.0
    for k, want in ref["state"].items():
        worst = max(worst, float((gathered.state_dict()[k] - want).abs().max()))
        torch.testing.assert_close(gathered.state_dict()[k], want, atol=1e-4, rtol=1e-3, msg=lambda m, k=k: f"{layout} {k}: {m}")
    print(f"hstu {layout} sgd/sgd: max |loss diff| over {STEPS} steps {diffs.max():.2e}, max |parameter diff| {worst:.2e}")


@pytest.mark.parametrize("layout", ["tw2", "rw2"])
def test_pipelined_training_matches_single_process(layout: str, small_cfg: Any, features: Any, references: Any,
                                                   tmp_path: Path) -> None:
    """`train.pipeline=sparse_dist`: TorchRec's TrainPipelineSparseDist overlaps the next batch's input
    distribution with this batch's step; under SGD the losses and weights are still one process's."""
    reference = references("sgd", "sgd")
    cfg = _train_layout(layout, ("sgd", "sgd"), small_cfg, reference, tmp_path, extra=("train.pipeline=sparse_dist",))
    assert cfg.train.pipeline == "sparse_dist"
    _compare(f"{layout} pipelined", cfg, features, reference, tmp_path)


def test_pipelined_training_refuses_layouts_it_cannot_run(small_cfg: Any, tmp_path: Path) -> None:
    from adsfm.contract.config import as_config, compose
    from adsfm.training.job import validate

    for bad in (["parallel=fsdp2"], ["experiment=synthetic_hstu"]):
        cfg = as_config(compose([f"run_root={tmp_path}", "train.pipeline=sparse_dist", *bad]))
        if "experiment=synthetic_hstu" not in bad:
            cfg.data = small_cfg.data
        with pytest.raises(ValueError, match="train.pipeline=sparse_dist pipelines pooled models"):
            validate(cfg)
