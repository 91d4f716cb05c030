"""A sequence model as two ONNX graphs: the user side (history → per-layer keys and values, computed once
per user and cached by serving) and the candidate side (candidates + that state → logits)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from adsfm.training.models.hstu import CandidateSide, HSTUDense, UserSide


def _save(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: tuple, path: Path,
          opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=names, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, verbose=False)
    assert program is not None
    program.save(str(path))


@torch.no_grad()
def export_split(dense: HSTUDense, num_context: int, dim: int, out: Path, opset: int) -> tuple[list[str], list[str]]:
    """Write user.onnx and candidate.onnx under `out`; returns the input names of each graph."""
    dense = dense.eval()
    layers = dense.blocks()
    n, m = 7, 5  # n: the start token and the events
    hist_len = torch.export.Dim("history", min=2, max=1 << 16)
    cands = torch.export.Dim("candidates", min=2, max=1 << 16)
    times = torch.arange(n, dtype=torch.int64) * 1000 + 1_000_000_000
    user_in = ["history", "times", "context"]
    events = torch.export.Dim("events", min=2, max=1 << 16)
    _save(UserSide(dense), (torch.randn(n - 1, dim), times, torch.randn(max(num_context, 1) * dim)), user_in,
          ["user_context", "keys", "values"], ({0: events}, {0: events + 1}, None), out / "user.onnx", opset)
    heads = layers[0].q.out_features // layers[0].attention_dim
    keys = torch.randn(len(layers), n, heads, layers[0].attention_dim)
    values = torch.randn(len(layers), n, heads, layers[0].linear_dim)
    cand_in = ["items", "request_time", "times", "user_context", "keys", "values"]
    _save(CandidateSide(dense), (torch.randn(m, dim), torch.tensor([2_000_000_000]), times, torch.randn(dim), keys, values),
          cand_in, ["logit"], ({0: cands}, None, {0: hist_len}, None, {1: hist_len}, {1: hist_len}), out / "candidate.onnx", opset)
    return user_in, cand_in
