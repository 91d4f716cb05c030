"""The delta log: embedding rows that continuous training changed, published in order for live replicas.

A log is a directory beside a registered bundle. Delta `seq` is the directory `seq_<seq:08d>/` holding

    delta.json          DeltaInfo: sequence number, event-time watermark, rows per table, bytes, window metrics
    tables.safetensors  per table `<table>.rows` (int64, sorted) and the rows in the served precision:
                        `<table>.weight` (fp32/fp16) or `<table>.codes` + `<table>.scale_bias` (int8)
    dense.onnx          the dense graph, every `continuous.dense_every` deltas (optional)

A delta is written under a temporary name and renamed into place (rename is atomic on one filesystem), so a
reader sees a delta whole or not at all; a crash mid-write leaves only a `.partial-*` directory, which
readers ignore and the next publish removes. Rolling back to `seq` moves the later deltas into
`rolled_back/` and bumps `generation`, which tells replicas to rebuild from the base and the deltas left.

Reading never unpickles: metadata is JSON, arrays are safetensors, each file checked against its sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

__all__ = ["DeltaInfo", "DeltaLog", "TableRows", "fsync_path"]

TableRows = dict[str, np.ndarray]
"""One table's part of a delta: "rows" and the stored arrays ("weight", or "codes" and "scale_bias")."""

_NAME = re.compile(r"^seq_(\d{8})$")


class DeltaInfo(BaseModel):
    """What a delta holds, for replicas, ML ops and the trainer that resumes after it."""

    seq: int
    """1, 2, ...: replicas apply deltas in this order, each once."""
    watermark: float
    """Event time (Unix seconds) of the newest event trained into this delta; freshness lag = now - this."""
    published_at: float = 0.0
    """Unix seconds when the delta became visible."""
    rows: dict[str, int] = Field(default_factory=dict)
    """Rows changed per table since the previous delta."""
    bytes: int = 0
    """Bytes of the delta's files."""
    window: dict[str, float] = Field(default_factory=dict)
    """auc, logloss and n of the recent window, scored before training on it (progressive validation)."""
    dense: bool = False
    """Whether dense.onnx replaces the dense graph."""
    position: dict[str, int | str] = Field(default_factory=dict)
    """The trainer's place in its source after this delta: rows [0, row) of `file` (of `rows`) and every file
    named before it are trained; a restarted trainer resumes exactly here."""
    checkpoint: str = ""
    """The trainer checkpoint holding the state this delta publishes."""
    sha256: dict[str, str] = Field(default_factory=dict)
    """sha256 of each file of the delta."""


class DeltaLog:
    """The deltas published into `path`, in order; publishing and rolling back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def generation(self) -> int:
        """Bumped by every rollback: a replica that saw another generation rebuilds its overlay."""
        g = self.path / "generation"
        return int(g.read_text()) if g.exists() else 0

    def published(self, after: int = 0) -> list[DeltaInfo]:
        """Every complete delta numbered above `after`, by sequence number (a follower reads only the new
        ones: the names are listed, and only their delta.json files parsed)."""
        if not self.path.is_dir():
            return []
        out = []
        for name in sorted(os.listdir(self.path)):
            m = _NAME.match(name)
            if m and int(m.group(1)) > after and (self.path / name / "delta.json").is_file():
                out.append(DeltaInfo.model_validate_json((self.path / name / "delta.json").read_text()))
        return sorted(out, key=lambda i: i.seq)

    def last(self) -> DeltaInfo | None:
        if not self.path.is_dir():
            return None
        names = sorted(n for n in os.listdir(self.path) if _NAME.match(n) and (self.path / n / "delta.json").is_file())
        return DeltaInfo.model_validate_json((self.path / names[-1] / "delta.json").read_text()) if names else None

    def directory(self, seq: int) -> Path:
        return self.path / f"seq_{seq:08d}"

    def tables(self, info: DeltaInfo) -> dict[str, TableRows]:
        """The delta's rows per table, checked against its sha256."""
        from safetensors.numpy import load

        blob = self._checked(info, "tables.safetensors")
        arrays = load(blob)
        out: dict[str, TableRows] = {}
        for key, a in arrays.items():
            table, _, part = key.rpartition(".")
            out.setdefault(table, {})[part] = a
        for table, parts in out.items():
            rows = parts.get("rows")
            if rows is None or rows.ndim != 1 or any(len(a) != len(rows) for a in parts.values()):
                raise ValueError(f"delta {info.seq}: table {table!r} has inconsistent arrays {({k: a.shape for k, a in parts.items()})}")
        return out

    def dense_graph(self, info: DeltaInfo) -> bytes | None:
        return self._checked(info, "dense.onnx") if info.dense else None

    def _checked(self, info: DeltaInfo, name: str) -> bytes:
        blob = (self.directory(info.seq) / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != info.sha256.get(name):
            raise ValueError(f"delta {info.seq}: {name} does not match its sha256")
        return blob

    def publish(self, info: DeltaInfo, tables: dict[str, TableRows], dense_graph: bytes | None = None) -> DeltaInfo:
        """Write delta `info.seq` (the next number) and make it visible at once; returns what was published."""
        from safetensors.numpy import save

        last = self.last()
        expected = (last.seq if last else 0) + 1
        if info.seq != expected:
            raise ValueError(f"delta log {self.path}: publishing seq {info.seq}, expected {expected}")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".partial-*"):  # a crashed publish: never visible, removed now
            shutil.rmtree(stale, ignore_errors=True)
        files = {"tables.safetensors": save({f"{t}.{k}": np.ascontiguousarray(a) for t, parts in tables.items() for k, a in parts.items()})}
        if dense_graph is not None:
            files["dense.onnx"] = dense_graph
        info = info.model_copy(update={
            "rows": {t: int(len(p["rows"])) for t, p in tables.items()},
            "bytes": sum(len(b) for b in files.values()),
            "dense": dense_graph is not None,
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()},
            "published_at": time.time(),
        })
        tmp = self.path / f".partial-{info.seq:08d}-{os.getpid()}"
        tmp.mkdir()
        for name, blob in {**files, "delta.json": info.model_dump_json(indent=1).encode()}.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, self.directory(info.seq))
        fsync_path(self.path)
        return info

    def rollback(self, to_seq: int) -> list[int]:
        """Withdraw every delta after `to_seq` (0: all of them); returns the withdrawn numbers. Replicas
        rebuild from the base and the deltas left when they see the new generation."""
        gone = [i.seq for i in self.published() if i.seq > to_seq]
        if not gone:
            return []
        away = self.path / "rolled_back" / f"generation_{self.generation() + 1}"
        away.mkdir(parents=True, exist_ok=True)
        for seq in sorted(gone, reverse=True):  # newest first: the log is a prefix at every moment
            os.rename(self.directory(seq), away / self.directory(seq).name)
        tmp = self.path / "generation.partial"
        tmp.write_text(str(self.generation() + 1))
        os.replace(tmp, self.path / "generation")
        fsync_path(self.path)
        return gone


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so the names renamed into it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
