"""Quantized tables: serving's numpy dequantization against fbgemm's and a float64 bound; int8 bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def test_int8_rowwise_dequantizes_like_fbgemm_and_within_half_a_step() -> None:
    import fbgemm_gpu  # noqa: F401

    from export.sparse import quantize
    from serving.ranker import dequantize

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
    from export.sparse import quantize
    from serving.ranker import dequantize

    w = torch.randn(10, 8)
    np.testing.assert_array_equal(dequantize(quantize(w, "fp16"), np.arange(10)), w.half().float().numpy())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_bundle_keeps_holdout_auc(precision: str, trained: dict[str, Any], small_cfg: Any, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from export.bundle import export_bundle

    cfg = OmegaConf.merge(small_cfg, {"export": {"precision": precision}})
    m = export_bundle(cfg, trained["checkpoint"], tmp_path / "b")  # type: ignore[arg-type]
    p = m.parity
    assert p is not None and p.quantized and p.passed
    assert p.auc_drop <= 0.002, p.reason()
    fp32 = trained["manifest"]
    ratio = sum(t.bytes for t in fp32.tables.values()) / sum(t.bytes for t in m.tables.values())
    # dim 16: fp16 halves the bytes; int8 stores 16 + 4 bytes per row instead of 64
    assert ratio > (1.9 if precision == "fp16" else 2.9), ratio
    assert (tmp_path / "b" / "card" / "model_card.md").exists()


def test_unknown_precision_names_the_table(small_cfg: Any, trained: dict[str, Any], tmp_path: Path) -> None:
    from omegaconf import OmegaConf, open_dict

    from export.bundle import export_bundle

    cfg = OmegaConf.merge(small_cfg, {})
    with open_dict(cfg):
        cfg.export.table_precision["item"] = "int4"
    with pytest.raises(ValueError, match="table 'item' = 'int4'"):
        export_bundle(cfg, trained["checkpoint"], tmp_path / "b")  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tables_are_memory_mapped_and_read_like_safetensors(precision: str, tmp_path: Path) -> None:
    """Serving maps a table file instead of reading it; the arrays equal the safetensors library's own read."""
    from safetensors.numpy import load_file

    from export.sparse import export_table
    from serving.ranker import mmap_safetensors

    path = tmp_path / "t.safetensors"
    export_table(torch.randn(1000, 24, generator=torch.Generator().manual_seed(1)), precision, path)
    mapped, read = mmap_safetensors(path), load_file(str(path))
    assert set(mapped) == set(read)
    for key, want in read.items():
        assert isinstance(mapped[key], np.memmap) and not mapped[key].flags.writeable
        assert mapped[key].dtype == want.dtype and mapped[key].shape == want.shape
        np.testing.assert_array_equal(mapped[key], want)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError):
        np.asarray(mmap_safetensors(truncated)[next(iter(read))]).sum()
