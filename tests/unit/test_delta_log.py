"""The delta log: published whole or not at all, read back exactly, in order, and rolled back as a prefix."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from adsfm.contract.delta import DeltaInfo, DeltaLog


def _tables(seq: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seq)
    rows = np.sort(rng.choice(1000, size=50 + seq, replace=False)).astype(np.int64)
    return {"item": {"rows": rows, "codes": rng.integers(0, 255, (len(rows), 8), dtype=np.uint8),
                     "scale_bias": rng.standard_normal((len(rows), 2)).astype(np.float16)},
            "user": {"rows": rows[:5], "weight": rng.standard_normal((5, 8)).astype(np.float32)}}


def test_a_published_delta_reads_back_exactly(tmp_path: Path) -> None:
    log = DeltaLog(tmp_path)
    info = log.publish(DeltaInfo(seq=1, watermark=1e9, window={"auc": 0.7}, position={"file": 0, "row": 10}), _tables(1), b"graph")
    assert info.rows == {"item": 51, "user": 5} and info.dense and info.bytes > 0
    [back] = log.published()
    assert back == info
    got = log.tables(back)
    for t, parts in _tables(1).items():
        for k, a in parts.items():
            assert np.array_equal(got[t][k], a) and got[t][k].dtype == a.dtype
    assert log.dense_graph(back) == b"graph"
    with pytest.raises(ValueError, match="publishing seq 3, expected 2"):
        log.publish(DeltaInfo(seq=3, watermark=0), _tables(3))
    (log.directory(1) / "tables.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="does not match its sha256"):
        log.tables(back)


def test_a_crash_mid_publish_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = DeltaLog(tmp_path)
    log.publish(DeltaInfo(seq=1, watermark=0), _tables(1))

    def crash(*_: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr("adsfm.contract.delta.os.rename", crash)
    with pytest.raises(OSError):
        log.publish(DeltaInfo(seq=2, watermark=0), _tables(2))
    monkeypatch.undo()
    assert [i.seq for i in log.published()] == [1] and list(tmp_path.glob(".partial-*"))  # written, never visible
    log.publish(DeltaInfo(seq=2, watermark=0), _tables(2))  # the next publish clears the debris
    assert [i.seq for i in log.published()] == [1, 2] and not list(tmp_path.glob(".partial-*"))


def test_a_reader_sees_whole_deltas_in_order_while_they_are_published(tmp_path: Path) -> None:
    log = DeltaLog(tmp_path)
    seen: list[list[int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                infos = DeltaLog(tmp_path).published()
                for i in infos:
                    DeltaLog(tmp_path).tables(i)  # every file present and matching its checksum
                seen.append([i.seq for i in infos])
            except BaseException as e:  # noqa: BLE001 - the test reports whatever the reader hit
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    for seq in range(1, 31):
        log.publish(DeltaInfo(seq=seq, watermark=seq), _tables(seq))
    done.set()
    reader.join()
    assert not errors, errors[:3]
    assert seen and all(s == list(range(1, len(s) + 1)) for s in seen)  # always a prefix of the log


def test_rollback_withdraws_the_later_deltas_and_bumps_the_generation(tmp_path: Path) -> None:
    log = DeltaLog(tmp_path)
    for seq in range(1, 5):
        log.publish(DeltaInfo(seq=seq, watermark=seq), _tables(seq))
    assert log.generation() == 0
    assert log.rollback(2) == [3, 4]
    assert [i.seq for i in log.published()] == [1, 2] and log.generation() == 1
    assert sorted(os.listdir(tmp_path / "rolled_back" / "generation_1")) == ["seq_00000003", "seq_00000004"]
    assert log.rollback(2) == []  # nothing after 2: nothing moves
    log.publish(DeltaInfo(seq=3, watermark=9), _tables(9))  # training goes on from delta 2
    assert [i.seq for i in log.published()] == [1, 2, 3]


def test_a_follower_reads_only_the_new_deltas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = DeltaLog(tmp_path)
    for seq in range(1, 6):
        log.publish(DeltaInfo(seq=seq, watermark=seq), _tables(seq))
    parsed: list[str] = []
    real = DeltaInfo.model_validate_json
    monkeypatch.setattr(DeltaInfo, "model_validate_json", classmethod(lambda cls, raw: parsed.append(raw) or real(raw)))
    assert [i.seq for i in log.published(after=3)] == [4, 5] and len(parsed) == 2
    assert log.last() is not None and log.last().seq == 5  # type: ignore[union-attr]
