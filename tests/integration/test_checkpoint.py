"""Checkpoints: a half-written one is never loaded; model + optimizer state resume the same trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def test_half_written_checkpoint_is_never_returned(trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    from adsfm.training.checkpoint import latest_checkpoint, save_checkpoint

    model = trained["model"]
    save_checkpoint(model, tmp_path / "step_10")

    def crash(*args: Any, **kwargs: Any) -> None:
        Path(kwargs["checkpoint_id"]).mkdir(parents=True)
        (Path(kwargs["checkpoint_id"]) / "__0_0.distcp").write_bytes(b"half")  # some shards hit the disk
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(model, tmp_path / "step_20")
    assert (tmp_path / "step_20.partial").exists() and not (tmp_path / "step_20").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"


def test_retention_keeps_the_newest(trained: dict[str, Any], tmp_path: Path) -> None:
    from adsfm.training.checkpoint import complete_checkpoints, save_checkpoint

    for step in (5, 10, 15, 20):
        save_checkpoint(trained["model"], tmp_path / f"step_{step}", keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_15", "step_20"]


def test_resume_continues_the_same_trajectory(small_cfg: Any, features: Any, tmp_path: Path) -> None:
    """Model and optimizer state (Adam moments, Adagrad sums) round-trip: 10 + 10 steps == 20 steps."""
    from adsfm.parallel.shard import unsharded_optimizer
    from adsfm.training.checkpoint import load_checkpoint, save_checkpoint
    from adsfm.training.data import iter_batches
    from adsfm.training.loop import train_step
    from adsfm.training.models.pooled import PooledRanker
    from adsfm.training.worker import optim_config

    batches = list(iter_batches(features.train_idx, 256, 0, 1, seed=3))[:20]

    def fresh() -> tuple[Any, Any]:
        torch.manual_seed(5)
        m = PooledRanker(features.spec, small_cfg.model, device="cpu")
        return m, unsharded_optimizer(m, optim_config(small_cfg))

    model, opt = fresh()
    straight = [train_step(model, opt, features.take(b)) for b in batches]

    model, opt = fresh()
    first = [train_step(model, opt, features.take(b)) for b in batches[:10]]
    save_checkpoint(model, tmp_path / "step_10", opt, {"step": 10})
    model, opt = fresh()  # a new process: same init seed, so only the checkpoint can make it continue right
    opt.init_state()
    assert load_checkpoint(model, tmp_path / "step_10", opt) == {"step": 10}
    second = [train_step(model, opt, features.take(b)) for b in batches[10:]]
    assert first + second == pytest.approx(straight, abs=1e-7)


def test_async_checkpoint_holds_the_state_at_save_and_publishes_when_complete(
    trained: dict[str, Any], small_cfg: Any, features: Any, tmp_path: Path
) -> None:
    import copy

    from adsfm.training.checkpoint import AsyncCheckpointer, latest_checkpoint, load_into_unsharded
    from adsfm.training.models.pooled import PooledRanker

    model = copy.deepcopy(trained["model"])
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    saver = AsyncCheckpointer()
    saver.save(model, tmp_path / "step_10", state={"step": 10})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the checkpoint is written
    assert saver.wait() == tmp_path / "step_10" and latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert (tmp_path / "step_10" / "state.json").read_text() == '{"step": 10}'
    restored = PooledRanker(features.spec, small_cfg.model, device="cpu")
    load_into_unsharded(restored, tmp_path / "step_10")
    for k, want in at_save.items():
        torch.testing.assert_close(restored.state_dict()[k], want, msg=lambda m, k=k: f"{k}: {m}")
