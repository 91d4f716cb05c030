"""Continuous training end to end, without Ray: a trained model follows event files, publishes deltas,
and replicas apply them.

- A replica that applied the deltas live (compacting its overlays into copies of its tables as they
  grew), one that replayed them onto the base afterwards (overlays only), and a bundle exported whole from
  the last delta's checkpoint look up the same bits for every row of every table.
- A trainer SIGKILLed mid-stream and restarted ends with exactly the weights of one that never stopped
  (an event trained twice, or skipped, would change them), and its deltas pick up where they stopped.
- A rollback takes a live replica back to the base plus the deltas left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _events(cfg: Any, features: Any, directory: Path, files: int, rows: int) -> Any:
    """The holdout's first `rows` events in time order, as `files` parquet files named in that order."""
    from adsfm.training.data import load_frame

    df, _ = load_frame(cfg.data)
    part = df.iloc[np.sort(features.holdout_idx)].sort_values(cfg.data.time_column, kind="stable").head(rows)
    directory.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(part)), files)):
        tmp = directory / f".events_{i:04d}.tmp"
        part.iloc[chunk].to_parquet(tmp)
        os.rename(tmp, directory / f"events_{i:04d}.parquet")  # files land whole
    return part


def _cfg(small_cfg: Any, source: Path, log: Path, **continuous: Any) -> Any:
    from omegaconf import OmegaConf

    from adsfm.contract.config import AdsfmConfig, typed

    return typed(AdsfmConfig, OmegaConf.merge(OmegaConf.structured(small_cfg), {
        "train": {"batch_size": 128},
        "continuous": {"source_dir": str(source), "delta_log": str(log), "publish_every_s": 0.0, "idle_exit_s": 1.0,
                       "poll_s": 0.05, **continuous},
    }))


def _train(cfg: Any, trained: dict[str, Any], work: Path) -> list[Any]:
    import torch.distributed as dist

    from adsfm.contract.delta import DeltaLog
    from adsfm.export.delta import DeltaPublisher
    from adsfm.training.continuous import ContinuousTrainer
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        m = trained["manifest"]
        trainer = ContinuousTrainer(cfg, m.features, trained["checkpoint"], work, DeltaPublisher(cfg, m, DeltaLog(cfg.continuous.delta_log)))
        return trainer.run()
    finally:
        dist.destroy_process_group()


def _all_rows(engine: Any) -> dict[str, np.ndarray]:
    return {t: engine.lookup(t, np.arange(engine.manifest.features.tables[t].rows)) for t in engine.tables}


def test_live_and_replayed_replicas_match_a_full_export(small_cfg: Any, features: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    from adsfm.contract.delta import DeltaLog
    from adsfm.export.bundle import export_bundle
    from adsfm.serving.deltas import DeltaFollower
    from adsfm.serving.engine import DenseGraphEngine

    _events(small_cfg, features, tmp_path / "events", files=2, rows=1000)
    cfg = _cfg(small_cfg, tmp_path / "events", tmp_path / "deltas", dense_every=3)
    live = DenseGraphEngine(trained["bundle"])
    follower = DeltaFollower(live, tmp_path / "deltas", compact_fraction=0.02, compact_dir=tmp_path / "compacted")
    stop = threading.Event()

    def follow() -> None:  # applies deltas while the trainer publishes them
        while not stop.is_set():
            follower.poll()
            time.sleep(0.01)

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        published = _train(cfg, trained, tmp_path)
    finally:
        stop.set()
        thread.join()
    follower.poll()
    log = DeltaLog(tmp_path / "deltas")
    infos = log.published()
    assert len(published) == len(infos) >= 8 and [i.seq for i in infos] == list(range(1, len(infos) + 1))
    assert infos[-1].position == {"file": "events_0001.parquet", "row": 500, "rows": 500} and sum(infos[-1].rows.values()) > 0
    assert [i.dense for i in infos] == [i.seq % 3 == 0 for i in infos]
    assert all(0.0 <= i.window["auc"] <= 1.0 for i in infos if "auc" in i.window)
    assert live.applied_seq == infos[-1].seq and follower.errors == 0
    assert follower.compactions > 0 and list((tmp_path / "compacted").glob("table_*.safetensors"))  # overlays folded into copies

    replayed = DenseGraphEngine(trained["bundle"])
    DeltaFollower(replayed, tmp_path / "deltas", compact_fraction=0).poll()  # all of it in the overlay
    whole = tmp_path / "whole"
    export_bundle(cfg, Path(infos[-1].checkpoint), whole)
    reference = DenseGraphEngine(whole)
    base = _all_rows(DenseGraphEngine(trained["bundle"]))
    a, b, ref = _all_rows(live), _all_rows(replayed), _all_rows(reference)
    for t in ref:
        assert np.array_equal(a[t], b[t]) and np.array_equal(a[t], ref[t]), t
    assert any(not np.array_equal(base[t], ref[t]) for t in ref)  # the deltas changed the model
    # Scores: the same bits live and replayed; the dense graph came with delta 3k, so they match the full
    # export's only up to the graph's last update.
    req = features.item_store and list(features.item_store)[:50]
    user = {"user_id": "1", "gender": "M", "occupation": "technician", "age": 30}
    items = [{"item_id": i} for i in req]
    assert np.array_equal(live.score(user, items), replayed.score(user, items))


def test_a_killed_trainer_resumes_after_its_last_delta_exactly_once(small_cfg: Any, features: Any, trained: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    from adsfm.contract.delta import DeltaLog
    from adsfm.training.checkpoint import load_into_unsharded
    from adsfm.training.models import build_model

    _events(small_cfg, features, tmp_path / "events", files=3, rows=1500)
    # the reference: never stopped
    straight = _cfg(small_cfg, tmp_path / "events", tmp_path / "straight")
    _train(straight, trained, tmp_path / "straight")

    cfg = _cfg(small_cfg, tmp_path / "events", tmp_path / "killed")
    spec = tmp_path / "job.json"
    from adsfm.contract.config import to_plain

    spec.write_text(json.dumps({"cfg": to_plain(cfg), "bundle": str(trained["bundle"]), "checkpoint": str(trained["checkpoint"]),
                                "work_dir": str(tmp_path / "killed")}))
    log = DeltaLog(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.continuous", str(spec)], cwd=ROOT)
    deadline = time.time() + 300
    while (last := log.last()) is None or last.seq < 4:
        assert proc.poll() is None and time.time() < deadline, "the trainer stopped before its 4th delta"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = log.last()
    assert killed_at is not None
    subprocess.run([sys.executable, "-m", "tests.integration.continuous", str(spec)], cwd=ROOT, check=True, timeout=300)
    infos = log.published()
    assert [i.seq for i in infos] == list(range(1, len(infos) + 1)) and len(infos) > killed_at.seq
    assert infos[-1].position == {"file": "events_0002.parquet", "row": 500, "rows": 500}

    a = build_model(trained["manifest"].features, small_cfg.model, device="cpu")
    b = build_model(trained["manifest"].features, small_cfg.model, device="cpu")
    load_into_unsharded(a, Path(DeltaLog(tmp_path / "straight").published()[-1].checkpoint))
    load_into_unsharded(b, Path(infos[-1].checkpoint))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa), [k for k in sa if not np.array_equal(sa[k].numpy(), sb[k].numpy())]


def test_a_rolled_back_log_takes_a_live_replica_back(small_cfg: Any, features: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    from adsfm.contract.delta import DeltaLog
    from adsfm.serving.deltas import DeltaFollower
    from adsfm.serving.engine import DenseGraphEngine

    _events(small_cfg, features, tmp_path / "events", files=1, rows=640)
    _train(_cfg(small_cfg, tmp_path / "events", tmp_path / "deltas"), trained, tmp_path)
    log = DeltaLog(tmp_path / "deltas")
    assert len(log.published()) == 5
    live = DenseGraphEngine(trained["bundle"])
    follower = DeltaFollower(live, log.path)
    assert follower.poll() == 5
    assert log.rollback(2) == [3, 4, 5]
    follower.poll()
    assert live.applied_seq == 2
    two = DenseGraphEngine(trained["bundle"])
    for info in log.published():
        two.apply_delta(info.seq, info.watermark, log.tables(info))
    a, b = _all_rows(live), _all_rows(two)
    assert all(np.array_equal(a[t], b[t]) for t in a)
    assert [p.name for p in (log.path / "rolled_back" / "generation_1").iterdir()] != []


def test_a_delta_invalidates_exactly_the_user_states_built_on_its_rows(features: Any, trained: dict[str, Any]) -> None:
    import torch

    from adsfm.export.sparse import quantize
    from adsfm.serving.engine import DenseGraphEngine

    engine = DenseGraphEngine(trained["bundle"])
    m = engine.manifest
    items = [{"item_id": i} for i in list(features.item_store)[:20]]
    one = {"user_id": "1", "gender": "M", "occupation": "technician", "age": 24}
    two = {"user_id": "2", "gender": "M", "occupation": "technician", "age": 24}
    before = engine.score(one, items), engine.score(two, items)
    uid = m.features.sparse_feature("user_id")
    row = engine.rows_of(uid, "1", "user_id")
    assert len(row) == 1 and row[0] != engine.rows_of(uid, "2", "user_id")[0]
    table = uid.table_name
    moved = torch.from_numpy(engine.lookup(table, row) + 0.5)
    engine.apply_delta(1, 1e9, {table: {"rows": row, **quantize(moved, m.tables[table].precision)}})
    info = engine.user_cache_info()
    # user 2's state, built on other rows, is still a hit; user 1's is computed again, with the new row
    assert np.array_equal(engine.score(two, items), before[1]) and engine.user_cache_info().hits == info.hits + 1
    assert not np.allclose(engine.score(one, items), before[0]) and engine.user_cache_info().misses == info.misses + 1
    fresh = DenseGraphEngine(trained["bundle"])  # no cache: the delta's row, looked up now
    fresh.apply_delta(1, 1e9, {table: {"rows": row, **quantize(moved, m.tables[table].precision)}})
    assert np.array_equal(engine.score(one, items), fresh.score(one, items))
    # A bad delta changes nothing and says why.
    n = m.features.tables[table].rows
    bad = {table: {"rows": np.array([n]), **quantize(moved, m.tables[table].precision)}}
    with pytest.raises(ValueError, match=r"rows must be sorted, distinct and in \[0, "):
        engine.apply_delta(2, 2e9, bad)
    with pytest.raises(ValueError, match="delta 3 out of order: this replica applied 1"):
        engine.apply_delta(3, 3e9, {})
    assert engine.applied_seq == 1 and engine.watermark == 1e9


def test_a_served_replica_follows_its_versions_delta_log_over_http(ray_cluster: None, serve_port: int, small_cfg: Any, features: Any,
                                                                   trained: dict[str, Any], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A Ray Serve replica of a registered version picks up the delta log the version is tagged with, applies
    deltas as the trainer publishes them, and answers over HTTP exactly as a replica that replayed the log;
    /metrics shows the applied sequence number and the freshness lag. ML ops list the deltas under the
    version and roll the last two back; the replica follows."""
    import requests
    from mlflow.tracking import MlflowClient

    from adsfm.contract.config import ServeConfig
    from adsfm.contract.delta import DeltaLog
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register
    from adsfm.serving import app
    from adsfm.serving.deltas import DeltaFollower
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.data import example_request, load_frame

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_and_register(trained["bundle"], "fresh", uri, run_id=None, experiment_id=ensure_experiment(uri, "fresh", str(tmp_path)))
    MlflowClient(uri).set_model_version_tag("fresh", "1", "adsfm.delta_log", str(tmp_path / "deltas"))  # as adsfm-continuous does
    cfg = ServeConfig(port=serve_port, model_name="fresh", max_candidates=100, batch_wait_ms=1, reload_interval_s=0.5, delta_poll_s=0.1)
    url = app.start(cfg, uri, name="fresh-test")
    try:
        df, _ = load_frame(small_cfg.data)
        req = example_request(df, features.spec, int(features.holdout_idx[7]), [str(i) for i in range(1, 41)])
        before = requests.post(f"{url}/v1/rank", json=req, timeout=30).json()
        _events(small_cfg, features, tmp_path / "events", files=1, rows=512)
        _train(_cfg(small_cfg, tmp_path / "events", tmp_path / "deltas"), trained, tmp_path)
        last = DeltaLog(tmp_path / "deltas").last()
        assert last is not None and last.seq == 4
        deadline = time.time() + 60
        while f"adsfm_delta_applied_seq {last.seq}.0" not in (text := requests.get(f"{url}/metrics", timeout=10).text):
            assert time.time() < deadline, [ln for ln in text.splitlines() if "delta" in ln]
            time.sleep(0.2)
        lag = float(next(ln for ln in text.splitlines() if ln.startswith("adsfm_freshness_lag_seconds")).split()[1])
        assert lag >= time.time() - last.watermark - 60  # now minus the newest event trained (MovieLens: 1997)
        after = requests.post(f"{url}/v1/rank", json=req, timeout=30).json()
        replayed = DenseGraphEngine(trained["bundle"])
        DeltaFollower(replayed, tmp_path / "deltas").poll()
        want = replayed.score(req["user"], req["candidates"])
        got = {c["item"]["item_id"]: c["score"] for c in after["candidates"]}
        assert all(abs(got[c["item_id"]] - float(w)) <= 1e-6 for c, w in zip(req["candidates"], want, strict=True))
        assert {c["item"]["item_id"]: c["score"] for c in before["candidates"]} != got

        # ML ops: the version lists its deltas, and withdrawing the last two takes the replica back.
        from adsfm.launch import models, rollback

        models.main(["fresh", "--tracking-uri", uri])
        listed = capsys.readouterr().out
        assert "deltas: 4 in" in listed and "  delta     4  events to 1997-" in listed, listed
        rollback.main(["fresh", "--delta", "2", "--tracking-uri", uri])
        assert "deltas [3, 4] withdrawn" in capsys.readouterr().out
        while "adsfm_delta_applied_seq 2.0" not in (text := requests.get(f"{url}/metrics", timeout=10).text):
            assert time.time() < deadline + 60, [ln for ln in text.splitlines() if "delta" in ln]
            time.sleep(0.2)
        two = DenseGraphEngine(trained["bundle"])
        DeltaFollower(two, tmp_path / "deltas").poll()
        assert two.applied_seq == 2
        got = {c["item"]["item_id"]: c["score"] for c in requests.post(f"{url}/v1/rank", json=req, timeout=30).json()["candidates"]}
        want = two.score(req["user"], req["candidates"])
        assert all(abs(got[c["item_id"]] - float(w)) <= 1e-6 for c, w in zip(req["candidates"], want, strict=True))
    finally:
        app.stop("fresh-test")


def test_a_bad_event_file_is_passed_over_and_recorded(small_cfg: Any, features: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    """A file without the label column is not trained on, is named with the reason in rejected.jsonl,
    and the files after it train as usual."""
    part = _events(small_cfg, features, tmp_path / "events", files=3, rows=384)
    bad = tmp_path / "events" / "events_0001.parquet"
    part.iloc[128:256].drop(columns=[small_cfg.data.label]).to_parquet(bad)
    published = _train(_cfg(small_cfg, tmp_path / "events", tmp_path / "deltas"), trained, tmp_path)
    assert published[-1].position == {"file": "events_0002.parquet", "row": 128, "rows": 128}
    [rejected] = [json.loads(line) for line in (tmp_path / "deltas" / "rejected.jsonl").read_text().splitlines()]
    assert rejected["file"] == str(bad) and f"data.label={small_cfg.data.label!r} is not a column" in rejected["reason"]
    assert len(published) == 2  # a delta per trained file (one batch each), none for the bad one


def test_adsfm_continuous_starts_from_a_registered_version(small_cfg: Any, features: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    """The command: models:/NAME@champion → the version's training run (its lineage), the version tagged
    with the delta log, deltas published until the source is idle; bad arguments fail before anything starts."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from adsfm.contract.delta import DeltaLog
    from adsfm.contract.tracking import ensure_experiment
    from adsfm.export.register import log_and_register

    run_dir = Path(trained["manifest"].source_checkpoint).parent.parent  # what adsfm-train leaves beside its checkpoints
    if not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(small_cfg)))
        (run_dir / "train_result.json").write_text(json.dumps({"checkpoint": str(trained["checkpoint"])}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_and_register(trained["bundle"], "cont", uri, run_id=None, experiment_id=ensure_experiment(uri, "cont", str(tmp_path)))
    _events(small_cfg, features, tmp_path / "events", files=2, rows=256)
    cli = Path(sys.executable).parent / "adsfm-continuous"
    env = {**os.environ, "ADSFM_RUNS": str(tmp_path)}
    args = [str(cli), "continuous.start_from=models:/cont@champion", f"continuous.source_dir={tmp_path / 'events'}",
            f"continuous.delta_log={tmp_path / 'deltas'}", "continuous.publish_every_s=0", "continuous.idle_exit_s=1",
            "train.batch_size=128", f"mlflow.tracking_uri={uri}"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert MlflowClient(uri).get_model_version("cont", "1").tags["adsfm.delta_log"] == str(tmp_path / "deltas")
    infos = DeltaLog(tmp_path / "deltas").published()
    assert [i.seq for i in infos] == [1, 2] and infos[-1].position == {"file": "events_0001.parquet", "row": 128, "rows": 128}
    for bad, why in [(["model.arch=hstu"], "only continuous.*, train.* and mlflow.* overrides"),
                     (["continuous.start_from=cont"], "use models:/NAME@ALIAS or models:/NAME/VERSION"),
                     (["continuous.publish_everys=1"], "publish_everys"),
                     (["continuous.start_from=models:/cont@champion", "continuous.source_dir=/nonexistent"], "is not a directory")]:
        out = subprocess.run([str(cli), *bad, *([] if any("source_dir" in b for b in bad) else [f"continuous.source_dir={tmp_path}"])],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and why in out.stderr, (bad, out.stderr[-2000:])


def test_the_gate_holds_back_a_delta_that_moves_a_row_too_far(small_cfg: Any, features: Any, trained: dict[str, Any],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _events(small_cfg, features, tmp_path / "events", files=1, rows=256)
    published = _train(_cfg(small_cfg, tmp_path / "events", tmp_path / "deltas", max_row_change=1e-9), trained, tmp_path)
    assert published == [] and not (tmp_path / "deltas").exists()  # nothing reached the log
    assert "delta 1 held back: table " in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"max_row_change\(-1.0\) > 0"):
        _train(_cfg(small_cfg, tmp_path / "events", tmp_path / "deltas", max_row_change=-1.0), trained, tmp_path)


@pytest.fixture(scope="module")
def managed_trained(small_cfg: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A DLRM whose item and user tables are managed and too small for their ids (1,614 items in 1,024
    rows, 943 users in 512), trained one process, checkpointed with its remap and exported."""
    import copy

    from omegaconf import open_dict

    from adsfm.export.bundle import export_bundle
    from adsfm.training.checkpoint import save_checkpoint
    from adsfm.training.data import load_features
    from adsfm.training.local import train_local

    cfg = copy.deepcopy(small_cfg)
    with open_dict(cfg.model.tables):
        cfg.model.tables["item"] = {"collision": "managed", "size": 1024, "eviction": "lru"}
        cfg.model.tables["user_id"] = {"collision": "managed", "size": 512, "eviction": "lfu"}
    fs = load_features(cfg.data, cfg.model.tables)
    root = tmp_path_factory.mktemp("managed")
    ckpt = save_checkpoint(train_local(cfg, fs), root / "checkpoints" / "step_1", managed=fs.managed)
    manifest = export_bundle(cfg, ckpt, root / "bundle")
    return {"cfg": cfg, "features": fs, "checkpoint": ckpt, "bundle": root / "bundle", "manifest": manifest}


def test_managed_tables_move_ids_live_as_a_replay_and_a_full_export_do(managed_trained: dict[str, Any], tmp_path: Path) -> None:
    """New ids take rows while the trainer follows the events; each delta carries the ids its rows hold.
    A live replica, a replayed one and a bundle exported whole from the last checkpoint agree on every
    row's value and on which id each managed row holds, and a restart in between changes nothing."""
    from adsfm.contract.delta import DeltaLog
    from adsfm.export.bundle import export_bundle
    from adsfm.serving.deltas import DeltaFollower
    from adsfm.serving.engine import DenseGraphEngine
    from adsfm.training.checkpoint import load_into_unsharded
    from adsfm.training.models import build_model

    m, fs = managed_trained["manifest"], managed_trained["features"]
    _events(managed_trained["cfg"], fs, tmp_path / "events", files=2, rows=1000)
    cfg = _cfg(managed_trained["cfg"], tmp_path / "events", tmp_path / "deltas", dense_every=1)
    live = DenseGraphEngine(managed_trained["bundle"])
    follower = DeltaFollower(live, tmp_path / "deltas", compact_fraction=0)
    infos = [*_train(cfg, managed_trained, tmp_path / "work")]
    follower.poll()
    log = DeltaLog(tmp_path / "deltas")
    assert live.applied_seq == log.last().seq == len(infos) and follower.errors == 0  # type: ignore[union-attr]
    tables = log.tables(infos[-1])
    assert set(tables["item"]) == {"rows", "codes", "scale_bias", "keys"} if m.tables["item"].precision == "int8" else "keys" in tables["item"]

    base = DenseGraphEngine(managed_trained["bundle"])
    moved = {t: int((live.featurizer.slot_keys(t) != base.featurizer.slot_keys(t)).sum()) for t in ("item", "user_id")}
    assert moved["item"] > 0, moved  # the holdout's items the table did not hold took rows
    replayed = DenseGraphEngine(managed_trained["bundle"])
    DeltaFollower(replayed, tmp_path / "deltas", compact_fraction=0).poll()
    whole = tmp_path / "whole"
    export_bundle(cfg, Path(infos[-1].checkpoint), whole)
    reference = DenseGraphEngine(whole)
    a, b, ref = _all_rows(live), _all_rows(replayed), _all_rows(reference)
    for t in ref:
        assert np.array_equal(a[t], b[t]) and np.array_equal(a[t], ref[t]), t
    for t in ("item", "user_id"):
        want = np.array(reference.manifest.features.tables[t].slot_keys)
        assert np.array_equal(live.featurizer.slot_keys(t), want) and np.array_equal(replayed.featurizer.slot_keys(t), want), t
    items = [{"item_id": i} for i in list(fs.item_store)[:300]]
    user = {"user_id": "1", "gender": "M", "occupation": "technician", "age": 30}
    assert np.array_equal(live.score(user, items), replayed.score(user, items))
    assert np.allclose(live.score(user, items), reference.score(user, items), atol=1e-6)  # every delta brought the graph

    # Stopped after the first file and started again: the remap and the weights end exactly as straight through.
    _events(managed_trained["cfg"], fs, tmp_path / "halves", files=2, rows=1000)
    first = tmp_path / "halves" / "events_0001.parquet"
    first.rename(tmp_path / "later.parquet")
    halves = _cfg(managed_trained["cfg"], tmp_path / "halves", tmp_path / "halves_deltas")
    _train(halves, managed_trained, tmp_path / "halves_work")
    (tmp_path / "later.parquet").rename(first)
    _train(halves, managed_trained, tmp_path / "halves_work")
    end = DeltaLog(tmp_path / "halves_deltas").last()
    assert end is not None and end.position == infos[-1].position
    x = build_model(m.features, cfg.model, device="cpu")
    y = build_model(m.features, cfg.model, device="cpu")
    load_into_unsharded(x, Path(infos[-1].checkpoint))
    load_into_unsharded(y, Path(end.checkpoint))
    assert all(torch_equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())
    from adsfm.training.checkpoint import load_managed
    from adsfm.training.managed import ManagedIds

    p, q = ManagedIds(m.features), ManagedIds(m.features)
    load_managed(p, Path(infos[-1].checkpoint))
    load_managed(q, Path(end.checkpoint))
    assert all(np.array_equal(p.slot_keys(t), q.slot_keys(t)) for t in ("item", "user_id"))


def torch_equal(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.numpy(), b.numpy()))
