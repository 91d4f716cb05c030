"""HSTU attention kernels: Triton against the PyTorch reference and padded SDPA, correctness and speed, one run.

    python bench/gpu_kernels.py [--quick] [--out FILE.json]     # on a CUDA machine, well under 5 minutes
    python bench/gpu_kernels.py --interpret                     # on CPU: tiny shapes, correctness only

Needs only torch, triton and numpy (no fbgemm, torchrec or ray). For each shape (B sequences, lengths uniform
in [1, N], H heads, D = 64) and dtype (float32, bfloat16):

- correctness: relative Frobenius errors of the Triton forward and of every gradient (q, k, v, pos_w, ts_w)
  against the reference evaluated in float64 on the same inputs (first 8 sequences, to bound its memory),
  checked against parallel.kernels.ERROR_BOUNDS;
- speed (CUDA only): median milliseconds by triton.testing.do_bench of Triton forward and forward+backward,
  the PyTorch reference (the CPU training path, here on the GPU), and torch SDPA on the same batch padded to
  [B, H, N, D] with a causal mask (a speed baseline only: softmax attention, no bias, no candidate mask,
  padding done outside the timed call).

Ratios are baseline time / Triton time, so > 1 means the Triton kernel is faster. Keys without a dtype suffix
are bfloat16; ``_fp32`` marks float32.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEAVES = ("q", "k", "v", "pos_w", "ts_w")
# Alternative (BLOCK_M, BLOCK_N, num_warps) per kernel, timed against the defaults at N=1024 in bfloat16, so
# that one GPU run shows whether parallel/kernels/hstu_triton.py's GPU_TILES should change.
TILE_SWEEP: dict[str, dict[str, tuple[int, int, int]]] = {
    "previous": {"fwd": (64, 64, 8), "dkdv": (64, 64, 8), "dq": (64, 32, 8)},
    "large": {"fwd": (128, 64, 8), "dkdv": (64, 128, 8), "dq": (64, 64, 8)},
    "tiny": {"fwd": (32, 32, 4), "dkdv": (32, 32, 4), "dq": (32, 16, 4)},
}
BASE_TS = 1_700_000_000
CHECK_SEQS = 8


def make_inputs(
    B: int, N: int, targets: int, H: int, D: int, P: int, NT: int, dtype: Any, device: str, seed: int,
) -> dict[str, Any]:
    """A jagged batch: lengths uniform in [1, N], min(targets, length) candidates each, timestamps near 1e9."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=gen)
    lengths[0] = N  # the longest sequence sets the padded size for every method
    T = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    # Sorted times, as a user's history is: gaps from seconds to years, some repeated.
    steps = (4.0 ** (torch.rand(T, generator=gen, dtype=torch.float64) * 10)).long()
    steps = torch.where(torch.rand(T, generator=gen) < 0.2, 0, steps)
    ts = BASE_TS + steps.cumsum(0)

    def rnd(*shape: int, dt: Any = dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dt).requires_grad_()

    return {
        "q": rnd(T, H, D), "k": rnd(T, H, D), "v": rnd(T, H, D),
        "seq_offsets": offsets.to(device), "num_targets": lengths.clamp(max=targets).to(device),
        "timestamps": ts.to(device), "pos_w": rnd(P, dt=torch.float32, scale=0.3),
        "ts_w": rnd(NT, dt=torch.float32, scale=0.3), "max_seq_len": N, "alpha": 1.0 / D**0.5, "norm": float(N),
    }


def first_sequences(inputs: dict[str, Any], count: int) -> dict[str, Any]:
    """The same batch cut to its first `count` sequences (float64 reference memory grows with B * N * N)."""
    offsets = inputs["seq_offsets"]
    count = min(count, offsets.numel() - 1)
    rows = int(offsets[count])
    cut = {n: inputs[n].detach()[:rows].requires_grad_() for n in ("q", "k", "v")}
    return {
        **inputs, **cut, "seq_offsets": offsets[: count + 1], "num_targets": inputs["num_targets"][:count],
        "timestamps": inputs["timestamps"][:rows],
        "pos_w": inputs["pos_w"].detach().clone().requires_grad_(),
        "ts_w": inputs["ts_w"].detach().clone().requires_grad_(),
    }


def rel_err(x: Any, ref: Any) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not bool(x.isfinite().all()):
        return float("inf")
    den = float(ref.norm())
    return float((x - ref).norm()) / (den if den > 0 else 1.0)


def errors(inputs: dict[str, Any], triton_fn: Callable[..., Any], reference: Callable[..., Any]) -> dict[str, float]:
    """Forward and per-gradient relative errors of Triton against the float64 reference."""
    import torch

    out = triton_fn(**inputs)
    ref_in = {**inputs, **{n: inputs[n].detach().double().requires_grad_() for n in LEAVES}}
    ref = reference(**ref_in)
    # The incoming gradient is an input too: both sides get the same values, rounded to the output's dtype.
    g = torch.randn(out.shape, device=out.device, dtype=torch.float64).to(out.dtype)
    got = torch.autograd.grad(out, [inputs[n] for n in LEAVES], g)
    want = torch.autograd.grad(ref, [ref_in[n] for n in LEAVES], g.double())
    errs = {"fwd": rel_err(out, ref)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(LEAVES, got, want, strict=True)})
    return errs


def pad(inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """q, k, v as [B, H, N, D] zero-padded tensors (leaves), for the SDPA baseline."""
    import torch

    offsets = inputs["seq_offsets"]
    B, N = offsets.numel() - 1, inputs["max_seq_len"]
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(B, device=offsets.device), lengths)
    local = torch.arange(seq.numel(), device=offsets.device) - offsets[:-1][seq]
    out = []
    for n in ("q", "k", "v"):
        x = inputs[n].detach()
        p = x.new_zeros(B, N, *x.shape[1:])
        p[seq, local] = x
        out.append(p.transpose(1, 2).contiguous().requires_grad_())
    return out[0], out[1], out[2]


def median_ms(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    from triton.testing import do_bench

    return {name: float(do_bench(fn, warmup=25, rep=100, return_mode="median")) for name, fn in fns.items()}


def phases(inputs: dict[str, Any], fn: Callable[..., Any], name: str) -> dict[str, Callable[[], Any]]:
    """``{name}_fwd`` (no autograd graph) and ``{name}_fwdbwd`` (forward, then every gradient) closures."""
    import torch

    leaves = [inputs[n] for n in LEAVES]
    g = torch.randn_like(inputs["v"])

    def fwd() -> Any:
        with torch.no_grad():
            return fn(**inputs)

    def fwd_bwd() -> Any:
        return torch.autograd.grad(fn(**inputs), leaves, g)

    return {f"{name}_fwd": fwd, f"{name}_fwdbwd": fwd_bwd}


def timings(inputs: dict[str, Any], triton_fn: Callable[..., Any], reference: Callable[..., Any]) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    qp, kp, vp = pad(inputs)
    gp = torch.randn_like(vp)

    def sdpa_fwd() -> Any:
        with torch.no_grad():
            return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

    def sdpa_fwd_bwd() -> Any:
        return torch.autograd.grad(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True), [qp, kp, vp], gp)

    fns = {**phases(inputs, triton_fn, "triton"), **phases(inputs, reference, "reference"),
           "sdpa_fwd": sdpa_fwd, "sdpa_fwdbwd": sdpa_fwd_bwd}
    return median_ms(fns)


def tile_sweep(B: int, H: int, D: int, NT: int, N: int, device: str, values: dict[str, float]) -> list[dict[str, Any]]:
    """Correctness and median times of the default tiles and each TILE_SWEEP entry, bf16, 64 candidates."""
    import torch

    from adsfm.parallel.kernels import hstu_attention_reference
    from adsfm.parallel.kernels.hstu_triton import hstu_attention_triton

    inputs = make_inputs(B, N, 64, H, D, P=N, NT=NT, dtype=torch.bfloat16, device=device, seed=N)
    check = first_sequences(inputs, CHECK_SEQS)
    rows: list[dict[str, Any]] = []
    for name, tiles in {"default": None, **TILE_SWEEP}.items():
        fn = functools.partial(hstu_attention_triton, tiles=tiles)
        row: dict[str, Any] = {"tiles": name}
        try:
            errs = errors(check, fn, hstu_attention_reference)
            row.update(err_fwd=errs["fwd"], err_bwd=max(e for n, e in errs.items() if n != "fwd"))
            row.update(median_ms(phases(inputs, fn, "triton")))
            values.update({f"sweep_{name}_{k}_ms_n{N}": t for k, t in row.items() if k.startswith("triton")})
        except Exception as exc:  # a config that does not compile is a finding, not a failure
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes, correctness only")
    ap.add_argument("--quick", action="store_true", help="the N=1024 shape only")
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    args = ap.parse_args()
    if args.interpret:
        # Triton reads this when the kernels are decorated, so before parallel.kernels.hstu_triton loads.
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from adsfm.parallel.kernels import ERROR_BOUNDS, hstu_attention_reference, triton_available
    from bench.common import result, write

    if not triton_available():
        print("bench/gpu_kernels.py: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if not args.interpret and not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA device; run on a GPU machine, or pass --interpret for a CPU "
              "correctness check on tiny shapes", file=sys.stderr)
        return 2
    from adsfm.parallel.kernels.hstu_triton import hstu_attention_triton

    device = "cpu" if args.interpret else "cuda"
    H, D, NT = (2, 16, 16) if args.interpret else (4, 64, 16)
    B = 3 if args.interpret else 32
    # (N, candidates per sequence)
    shapes = [(40, 8)] if args.interpret else [(1024, 64)] if args.quick else [(256, 0), (1024, 64), (2048, 64)]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}

    values: dict[str, float] = {}
    ratios: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for N, targets in shapes:
        for tag, dtype in dtypes.items():
            key = f"n{N}" + ("" if tag == "bf16" else f"_{tag}")
            row: dict[str, Any] = {"shape": f"B={B} N={N} tgt={targets}", "dtype": tag}
            try:
                inputs = make_inputs(B, N, targets, H, D, P=N, NT=NT, dtype=dtype, device=device, seed=N)
                errs = errors(first_sequences(inputs, CHECK_SEQS), hstu_attention_triton, hstu_attention_reference)
                fwd_bound, bwd_bound = ERROR_BOUNDS[dtype]
                bwd_err = max(e for n, e in errs.items() if n != "fwd")
                row.update(err_fwd=errs["fwd"], err_bwd=bwd_err)
                values[f"err_fwd_{key}"] = errs["fwd"]
                values.update({f"err_{n}_{key}": e for n, e in errs.items() if n != "fwd"})
                if not (errs["fwd"] <= fwd_bound and bwd_err <= bwd_bound):
                    failures.append(f"{row['shape']} {tag}: errors {errs} exceed bounds ({fwd_bound}, {bwd_bound})")
                if not args.interpret:
                    ms = timings(inputs, hstu_attention_triton, hstu_attention_reference)
                    row.update(ms)
                    values.update({f"{name}_ms_{key}": t for name, t in ms.items()})
                    for base in ("reference", "sdpa"):
                        for phase in ("fwd", "fwdbwd"):
                            ratios[f"triton_vs_{base}_{phase}_{key}"] = ms[f"{base}_{phase}"] / ms[f"triton_{phase}"]
                    row.update(vs_ref=ratios[f"triton_vs_reference_fwdbwd_{key}"],
                               vs_sdpa=ratios[f"triton_vs_sdpa_fwdbwd_{key}"])
            except Exception:  # one broken shape must not hide the others' figures
                traceback.print_exc()
                failures.append(f"{row['shape']} {tag}: raised (traceback above)")
            rows.append(row)
            print(row, flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    sweep_rows = [] if args.interpret or args.quick else tile_sweep(B, H, D, NT, 1024, device, values)

    cols = ["shape", "dtype", "err_fwd", "err_bwd", "triton_fwd", "triton_fwdbwd", "reference_fwd",
            "reference_fwdbwd", "sdpa_fwd", "sdpa_fwdbwd", "vs_ref", "vs_sdpa"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("\nHSTU attention (ms = median ms; vs_* = baseline fwd+bwd time / Triton fwd+bwd time)")
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        cells = [r.get(c, "-") for c in cols]
        print(" | ".join(f"{c:>18.3g}" if isinstance(c, float) else f"{c!s:>18}" for c in cells))
    if sweep_rows:
        print(f"\nTile sweep, bf16 N=1024 (BLOCK_M, BLOCK_N, num_warps per kernel): {TILE_SWEEP}")
        for r in sweep_rows:
            print(r)
    for f in failures:
        print("FAIL", f)
    config = {"B": B, "H": H, "D": D, "NT": NT, "shapes": shapes, "interpret": args.interpret, "tile_sweep": TILE_SWEEP,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    write(result("gpu_kernels", config, values, ratios), args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
