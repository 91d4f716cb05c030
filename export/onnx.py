"""The dense half of a model as an ONNX graph with a dynamic batch dimension."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def export_dense(dense: nn.Module, num_dense: int, num_sparse: int, dim: int, path: Path, opset: int) -> Path:
    dense = dense.eval()
    example = (torch.randn(4, max(num_dense, 1) if num_dense else 0), torch.randn(4, num_sparse, dim))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            dense,
            example,
            dynamo=True,
            input_names=["dense", "embeddings"],
            output_names=["logit"],
            dynamic_shapes=({0: batch}, {0: batch}),
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return path
