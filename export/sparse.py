"""Embedding tables out of a checkpoint, one at a time, into per-table safetensors files.

Precision per table: fp32; fp16; int8 row-wise (fbgemm's FloatToFusedNBitRowwiseQuantizedSBHalf at 8
bits: per-row fp16 scale and bias, so a row costs dim + 4 bytes instead of 4 * dim). The int8 file holds
the codes and a [rows, 2] scale/bias array separately, so serving dequantizes with numpy, no fbgemm. A table is loaded, quantized, written and dropped before the
next; from a checkpoint it is read a stored chunk (a rank's shard) at a time and each chunk quantized and
written at its rows, so export holds about the largest chunk, never a whole table, let alone the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _create_file_view
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

PRECISIONS = ("fp32", "fp16", "int8")


def quantize(weight: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    """Arrays to store for one table: {"weight": ...} or int8 {"codes": ..., "scale_bias": ...}."""
    w = weight.detach().float().contiguous()
    if precision == "fp32":
        return {"weight": w.numpy()}
    if precision == "fp16":
        return {"weight": w.half().numpy()}
    if precision == "int8":
        import fbgemm_gpu  # noqa: F401  registers torch.ops.fbgemm

        fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, 8).numpy()
        dim = w.shape[1]
        return {"codes": np.ascontiguousarray(fused[:, :dim]), "scale_bias": fused[:, dim : dim + 4].copy().view(np.float16)}
    raise ValueError(f"export precision {precision!r}: choose from {list(PRECISIONS)}")


def load_table(checkpoint: Path, key: str, shape: tuple[int, int]) -> torch.Tensor:
    """One table from a DCP checkpoint written by any number of ranks, without loading the others."""
    state = {"model": {key: torch.empty(shape)}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state["model"][key]


@dataclass
class StoredTable:
    """One table of a DCP checkpoint, read a stored chunk at a time: a row-wise shard holds a range of rows,
    a table-wise one the whole table. Export never needs the table whole, so its peak follows the largest
    chunk, and the eager reference gathers only the rows it looks up."""

    checkpoint: Path
    key: str
    """The table's key in the model's state dict (sparse.embedding_bags.<name>.weight)."""
    shape: tuple[int, int]

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of each stored chunk, in row order; the whole table at once when a chunk does not
        hold whole rows (column-wise sharding) or the storage transforms its bytes."""
        reader = dcp.FileSystemReader(str(self.checkpoint))
        meta = reader.read_metadata()
        fqn = f"model.{self.key}"
        tmeta = meta.state_dict_metadata.get(fqn)
        if not isinstance(tmeta, TensorStorageMetadata) or tuple(tmeta.size) != self.shape:
            found = None if tmeta is None else getattr(tmeta, "size", type(tmeta).__name__)
            raise ValueError(f"{self.checkpoint}: {self.key} should be a tensor of shape {self.shape}, found {found}")
        infos = {idx.offset: info for idx, info in meta.storage_data.items() if idx.fqn == fqn}
        whole_rows = all(c.offsets[1] == 0 and c.sizes[1] == self.shape[1] for c in tmeta.chunks)
        if not whole_rows or any(getattr(i, "transform_descriptors", None) for i in infos.values()):
            yield 0, load_table(self.checkpoint, self.key, self.shape)
            return
        for c in sorted(tmeta.chunks, key=lambda c: c.offsets[0]):
            info = infos[torch.Size(c.offsets)]
            with open(self.checkpoint / info.relative_path, "rb") as f:
                # the chunk's torch.save record, read in place (a bytes copy would double the chunk)
                view = cast(IO[bytes], _create_file_view(f, info.offset, info.length))
                t = torch.load(view, map_location="cpu", weights_only=True)
            yield int(c.offsets[0]), t.narrow(0, 0, c.sizes[0]).narrow(1, 0, c.sizes[1])
            del t

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows `ids` (any order, repeats allowed), [len(ids), dim], one chunk in memory at a time."""
        out = torch.empty((len(ids), self.shape[1]))
        for first, w in self.chunks():
            hit = (ids >= first) & (ids < first + len(w))
            out[hit] = w[ids[hit] - first]
        return out


_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8"}
_LAYOUTS: dict[str, dict[str, tuple[type, int | None]]] = {"fp32": {"weight": (np.float32, None)}, "fp16": {"weight": (np.float16, None)},
            "int8": {"codes": (np.uint8, None), "scale_bias": (np.float16, 2)}}


def export_table(weight: torch.Tensor | StoredTable, precision: str, path: Path) -> int:
    """Write one table (a tensor, or a checkpoint's table chunk by chunk) as a safetensors file; returns its
    bytes on disk. The file is written from the arrays' own memory (safetensors' save_file first copies
    each array into a bytes object), under a `.partial` name and renamed, so a crash never leaves a
    truncated table that looks whole."""
    if precision not in _LAYOUTS:
        raise ValueError(f"export precision {precision!r}: choose from {list(PRECISIONS)}")
    rows, dim = tuple(weight.shape)
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for key, (dtype, cols) in _LAYOUTS[precision].items():
        shape = [rows, cols or dim]
        nbytes = rows * shape[1] * np.dtype(dtype).itemsize
        header[key] = {"dtype": _DTYPES[np.dtype(dtype)], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    base = 8 + len(blob)
    chunks = weight.chunks() if isinstance(weight, StoredTable) else iter([(0, weight)])
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(base + offset)
        for first, w in chunks:
            for key, a in quantize(w, precision).items():
                begin = header[key]["data_offsets"][0]  # type: ignore[index]
                f.seek(base + begin + first * a.shape[1] * a.itemsize)
                f.write(np.ascontiguousarray(a).data)
            del w
        # Flushed and dropped from the page cache: export does not keep the model's tables resident, and the
        # parity check then reads the rows it needs as a replica on a fresh host would.
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tmp.replace(path)
    return path.stat().st_size
