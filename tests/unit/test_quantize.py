"""Quantized tables: serving's numpy dequantization against fbgemm's and a float64 bound; int8 bundles."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import torch


def test_int8_rowwise_dequantizes_like_fbgemm_and_within_half_a_step() -> None:
    import fbgemm_gpu  # noqa: F401

    from adsfm.export.sparse import quantize
    from adsfm.serving.engine import dequantize

    w = torch.randn(257, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 257)[:, None]
    q = quantize(w, "int8")
    rows = np.arange(257)
    got = dequantize(q, rows)
    fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, 8)
    np.testing.assert_array_equal(got, torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, 8).numpy())
    w64 = w.double().numpy()
    step = (w64.max(1) - w64.min(1)) / 255  # float64 reference of the row's quantization step
    err = np.abs(got - w64).max(1)
    assert (err <= 0.5 * step + 2e-3 * np.abs(w64).max(1)).all()  # + fp16 rounding of scale and bias


def test_fp16_is_a_plain_cast() -> None:
    from adsfm.export.sparse import quantize
    from adsfm.serving.engine import dequantize

    w = torch.randn(10, 8)
    np.testing.assert_array_equal(dequantize(quantize(w, "fp16"), np.arange(10)), w.half().float().numpy())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tables_are_memory_mapped_and_read_like_safetensors(precision: str, tmp_path: Path) -> None:
    """Serving maps a table file instead of reading it; the arrays equal the safetensors library's own read."""
    from safetensors.numpy import load_file

    from adsfm.export.sparse import export_table
    from adsfm.serving.engine import mmap_safetensors

    path = tmp_path / "t.safetensors"
    export_table(torch.randn(1000, 24, generator=torch.Generator().manual_seed(1)), precision, path)
    mapped, read = mmap_safetensors(path), load_file(str(path))
    assert set(mapped) == set(read)
    for key, want in read.items():
        base = mapped[key]
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap) and not mapped[key].flags.writeable  # a read-only view of the map
        assert mapped[key].dtype == want.dtype and mapped[key].shape == want.shape
        np.testing.assert_array_equal(mapped[key], want)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError):
        np.asarray(mmap_safetensors(truncated)[next(iter(read))]).sum()
