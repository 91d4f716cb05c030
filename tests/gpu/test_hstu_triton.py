"""HSTU attention Triton kernels on CUDA against the PyTorch reference evaluated in float64.

Needs only torch, triton and pytest (no fbgemm, torchrec or ray): run from the repository root with
``python -m pytest -q tests/gpu``. The bounds asserted are parallel.kernels.ERROR_BOUNDS, documented in
parallel/kernels/hstu_attention.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from adsfm.parallel.kernels import ERROR_BOUNDS, hstu_attention, hstu_attention_reference, triton_available

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]

BASE_TS = 1_700_000_000


def jagged_inputs(
    lengths: list[int], targets: list[int], H: int, Dqk: int, Dv: int, P: int, NT: int, dtype: torch.dtype,
    seed: int,
) -> dict[str, Any]:
    """Random CUDA inputs: timestamps near 1e9 with gaps over every time bucket, a third of them repeated."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    gaps = (4.0 ** (torch.rand(T, generator=gen, dtype=torch.float64) * NT)).long()
    ts = BASE_TS + torch.where(torch.rand(T, generator=gen) < 0.3, 0, gaps)

    def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dt).requires_grad_()

    return {
        "q": rnd(T, H, Dqk), "k": rnd(T, H, Dqk), "v": rnd(T, H, Dv),
        "seq_offsets": offsets.cuda(), "num_targets": torch.tensor(targets, dtype=torch.int64).cuda(),
        "timestamps": ts.cuda(), "pos_w": rnd(P, scale=0.3, dt=torch.float32), "ts_w": rnd(NT, scale=0.3, dt=torch.float32),
        "max_seq_len": max(lengths, default=0), "alpha": 1.0 / Dqk**0.5, "norm": float(max(lengths, default=1)),
    }


LEAVES = ("q", "k", "v", "pos_w", "ts_w")


def rel_err(x: Tensor, ref: Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values: a row was not written or the kernel overflowed"
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


def errors(inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Relative errors of the Triton output and every gradient against the float64 reference."""
    from adsfm.parallel.kernels import hstu_triton

    # NaN-filled outputs and gradients: a row the kernels never write fails the finiteness check.
    monkeypatch.setattr(hstu_triton, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    out = hstu_triton.hstu_attention_triton(**inputs)
    ref_inputs = {**inputs, **{n: inputs[n].detach().double().requires_grad_() for n in LEAVES}}
    ref = hstu_attention_reference(**ref_inputs)
    # The incoming gradient is an input too: both sides get the same values, rounded to the output's dtype.
    g = torch.randn(out.shape, device="cuda", dtype=torch.float64).to(out.dtype)
    got = torch.autograd.grad(out, [inputs[n] for n in LEAVES], g)
    want = torch.autograd.grad(ref, [ref_inputs[n] for n in LEAVES], g.double())
    errs = {"out": rel_err(out, ref)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(LEAVES, got, want, strict=True)})
    return errs


SHAPES = {
    # name: (lengths, targets, H, Dqk, Dv, P, NT)
    "ragged_small": ([0, 1, 2, 17, 63, 64, 65, 100], [0, 1, 0, 5, 63, 0, 64, 30], 2, 32, 32, 64, 16),
    "long": ([2000, 1999, 1, 0, 1500], [64, 0, 1, 0, 1500], 4, 64, 64, 2048, 16),
    "odd_dims_clamped": ([511, 300, 257, 129, 1], [64, 7, 0, 128, 0], 2, 48, 80, 100, 12),
    "wide_heads": ([300, 700, 256], [10, 64, 0], 1, 128, 128, 512, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_matches_reference(shape: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths, targets, H, Dqk, Dv, P, NT = SHAPES[shape]
    errs = errors(jagged_inputs(lengths, targets, H, Dqk, Dv, P, NT, dtype, seed=len(shape)), monkeypatch)
    fwd, bwd = ERROR_BOUNDS[dtype]
    print(shape, dtype, {n: f"{e:.2e}" for n, e in errs.items()})
    assert errs["out"] <= fwd, errs
    assert max(e for n, e in errs.items() if n != "out") <= bwd, errs


def test_dispatch_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from adsfm.parallel.kernels import hstu_triton

    calls: list[int] = []
    real = hstu_triton.hstu_attention_triton

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hstu_triton, "hstu_attention_triton", spy)
    monkeypatch.delenv("ADSFM_HSTU_KERNEL", raising=False)
    inputs = jagged_inputs([5, 9], [2, 0], 2, 16, 16, 8, 8, torch.float32, seed=1)
    out = hstu_attention(**inputs)
    assert calls == [1] and out.is_cuda


def test_empty_batches() -> None:
    from adsfm.parallel.kernels.hstu_triton import hstu_attention_triton

    for lengths in ([], [0, 0, 0]):
        inputs = jagged_inputs(lengths, [0] * len(lengths), 2, 16, 16, 8, 8, torch.bfloat16, seed=2)
        out = hstu_attention_triton(**inputs)
        assert out.shape == (0, 2, 16)
        out.sum().backward()
