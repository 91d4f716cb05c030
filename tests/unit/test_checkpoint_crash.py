"""Checkpoints survive a crash at any point: real SIGKILLs of a child process that saves, then the parent
finds the newest complete checkpoint and loads exactly the state that was saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))


def loaded(directory: Path) -> dict[str, torch.Tensor]:
    from adsfm.training.checkpoint import load_into_unsharded

    m = model(999)  # other weights than any saved: only the checkpoint can make them equal
    load_into_unsharded(m, directory)
    return m.state_dict()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def child(script: str, root: Path) -> subprocess.Popen[bytes]:
    """A Python process running `script` with `model`, the checkpoint module and `root` in scope."""
    prelude = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.unit.test_checkpoint_crash import model
        from adsfm.training import checkpoint as ck
        root = Path({str(root)!r})
    """)
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=ROOT)


def test_an_async_checkpoint_is_published_when_written_and_survives_a_sigkill(tmp_path: Path) -> None:
    """The training process saves in the background and goes on training (never calling save or wait
    again); once the checkpoint appears it is SIGKILLed: the checkpoint is the newest, with the weights
    of the moment it was saved and its state.json."""
    proc = child("""
        m = model(1)
        saver = ck.AsyncCheckpointer()
        saver.save(m, root / "step_10", state={"step": 10})
        while True:  # training goes on: the weights move, and nothing publishes but the writer itself
            with __import__("torch").no_grad():
                for p in m.parameters():
                    p.add_(1.0)
            time.sleep(0.01)
    """, tmp_path)
    from adsfm.training.checkpoint import latest_checkpoint, load_checkpoint

    try:
        deadline = time.monotonic() + 60
        while latest_checkpoint(tmp_path) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the child died before its checkpoint was published"
        assert latest_checkpoint(tmp_path) == tmp_path / "step_10", "an async checkpoint waited for the next save"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert_same(loaded(tmp_path / "step_10"), model(1).state_dict())
    assert load_checkpoint(model(2), tmp_path / "step_10") == {"step": 10}


@pytest.mark.parametrize("crash_after", ["published", "moved_aside"])
def test_a_crash_while_publishing_leaves_a_loadable_newest_checkpoint(tmp_path: Path, crash_after: str) -> None:
    """SIGKILL between publishing step_20 and removing what it outlives (keep=1): step_20 is the newest and
    loads. SIGKILL between moving a same-step checkpoint aside and publishing its replacement: the one moved
    aside is returned and loads."""
    script = {
        "published": """
            ck.save_checkpoint(model(1), root / "step_10", keep=1)
            ck._cleanup = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            ck.save_checkpoint(model(2), root / "step_20", keep=1)
        """,
        "moved_aside": """
            ck.save_checkpoint(model(1), root / "step_10")
            rename = Path.rename
            def crash_after_aside(self, target):
                out = rename(self, target)
                if str(target).endswith(".old"):
                    os.kill(os.getpid(), signal.SIGKILL)
                return out
            Path.rename = crash_after_aside
            ck.save_checkpoint(model(2), root / "step_10")
        """,
    }[crash_after]
    proc = child(script, tmp_path)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    from adsfm.training.checkpoint import latest_checkpoint

    newest = latest_checkpoint(tmp_path)
    if crash_after == "published":
        assert newest == tmp_path / "step_20" and (tmp_path / "step_10").exists()  # the cleanup never ran
        assert_same(loaded(newest), model(2).state_dict())
    else:
        assert newest == tmp_path / "step_10.old" and (tmp_path / "step_10.partial").exists()
        assert_same(loaded(newest), model(1).state_dict())


def test_every_file_and_directory_is_fsynced_before_the_publishing_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adsfm.training import checkpoint as ck

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path) -> Path:
        events.append(("rename", str(self)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    ck.save_checkpoint(model(1), tmp_path / "step_10", state={"step": 10})
    published = events.index(("rename", str(tmp_path / "step_10.partial")))
    synced = {path for kind, path in events[:published] if kind == "fsync"}
    partial = tmp_path / "step_10.partial"
    files = {str(partial / p.relative_to(tmp_path / "step_10")) for p in (tmp_path / "step_10").rglob("*")}
    assert files and files | {str(partial)} <= synced, sorted(files | {str(partial)} - synced)
    assert ("fsync", str(tmp_path)) in events[published:]  # the rename itself is made durable
