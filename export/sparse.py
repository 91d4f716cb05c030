"""Embedding tables out of a checkpoint, one at a time, into per-table safetensors files.

Precision per table: fp32; fp16; int8 row-wise (fbgemm's FloatToFusedNBitRowwiseQuantizedSBHalf at 8
bits: per-row fp16 scale and bias, so a row costs dim + 4 bytes instead of 4 * dim). The int8 file holds
the codes and a [rows, 2] scale/bias array separately, so serving dequantizes with numpy, no fbgemm. A table is loaded, quantized, written and dropped before the
next, so export holds about 2x the largest table, not the whole model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.numpy import save_file

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


def export_table(weight: torch.Tensor, precision: str, path: Path) -> int:
    """Write one table; returns its bytes on disk."""
    save_file(quantize(weight, precision), str(path))
    return path.stat().st_size
