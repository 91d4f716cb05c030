"""The registry policy on a real MLflow sqlite store: the champion history is an append-only record per
move (none lost to concurrent moves, no cap, read back in order); a split whose controller's lease has
lapsed reads as the champion alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest


@pytest.fixture()
def registry(tmp_path: Path) -> tuple[str, str]:
    """A registered model with 8 versions (no artifacts: the history needs none)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("hist")
    for _ in range(8):
        client.create_model_version("hist", source=str(tmp_path))
    return uri, "hist"


def test_eight_concurrent_promotes_keep_eight_entries_in_order(registry: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    from adsfm.contract.registry import champion_history, promote

    uri, name = registry
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def move(version: int) -> None:
        try:
            start.wait()
            promote(name, uri, version=str(version), reason=f"concurrent {version}")
        except BaseException as e:  # noqa: BLE001 - reported below, with the version
            errors.append(e)

    threads = [threading.Thread(target=move, args=(v,)) for v in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    history = champion_history(MlflowClient(uri), name)
    print(f"8 concurrent promotes: {len(history)} history entries, versions {[h['version'] for h in history]}")
    assert sorted(h["version"] for h in history) == [str(v) for v in range(1, 9)]
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)  # read back in time order
    assert {h["reason"] for h in history} == {f"concurrent {v}" for v in range(1, 9)}


def test_the_history_has_no_cap_and_rollback_reads_it(registry: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    from adsfm.contract.registry import champion_history, promote, rollback

    uri, name = registry
    moves = [str(1 + i % 8) for i in range(40)]  # 40 moves, each to another version
    for v in moves:
        promote(name, uri, version=v, reason=f"to {v}")
    assert rollback(name, uri, reason="bad") == (moves[-1], moves[-2])
    history = champion_history(MlflowClient(uri), name)
    assert [h["version"] for h in history] == [*moves, moves[-2]]  # 41 entries, the oldest kept
    assert history[-1]["kind"] == "rollback" and history[0]["previous"] is None


def test_a_split_past_its_lease_reads_as_the_champion_alone(registry: tuple[str, str]) -> None:
    import time

    from mlflow.tracking import MlflowClient

    from adsfm.contract.registry import CHALLENGER, Split, read_traffic, write_split

    uri, name = registry
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, CHALLENGER, "2")
    held = Split(challenger_pct=25.0, lease_until=time.time() + 60)
    write_split(client, name, held)
    t = read_traffic(client, name)
    assert t.split == held and t.lapsed is None
    gone = Split(challenger_pct=25.0, lease_until=time.time() - 1)  # its controller stopped renewing it
    write_split(client, name, gone)
    t = read_traffic(client, name)
    assert t.split == Split() and t.lapsed == gone and (t.champion, t.challenger) == ("1", "2")
    write_split(client, name, Split(challenger_pct=25.0))  # set by hand: no controller, no lease
    assert read_traffic(client, name).split.challenger_pct == 25.0
