"""Triton forward and backward kernels for HSTU jagged attention (semantics: parallel/kernels/hstu_attention.py).

FlashAttention-2 style: one program per (row block, sequence, head) walks key blocks of its own sequence, with
the relative bias computed in the kernel from positions, timestamps and num_targets, so no [B, N, N] tensor is
ever materialized. Accumulation is float32 for float32 and bfloat16 inputs.

Only key blocks that can hold allowed pairs are visited: keys below min(row block end, n_hist) (the causal
history), never a candidate key block. A candidate's one allowed candidate key is itself, so its diagonal term
is added row-wise, without a matmul over the candidate-by-candidate tile.

Backward is two kernels: one per history key block (dk, dv) and one per row block (dq; the bias gradients, so
that each score gradient is reduced into the bias tables exactly once; and the candidates' dk, dv, which come
from their diagonal term alone). Bias gradients are reduced in registers before any atomic: time buckets per
program into an [NT] vector; positions, for history rows, by diagonal (d = i - j is constant along one: a
gather skews the tile so that diagonals become columns) and, for candidate rows, by column (every candidate
sits at position n_hist); all that clamps to bucket P - 1 into one scalar per program.

This module imports Triton at import time: reach it through parallel.kernels.hstu_attention, which loads it only
when the Triton path is chosen. On CPU tensors it runs only under TRITON_INTERPRET=1, set before Triton loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

# Tiles per kernel: (BLOCK_M rows, BLOCK_N keys, num_warps). The GPU defaults are the ones that compiled for
# sm_90 with the least register spill at head dim 64 (ptxas resource usage); 3xTF32 float32 dots need more
# registers, hence smaller float32 tiles. bench/gpu_kernels.py times alternatives.
Tiles = dict[str, tuple[int, int, int]]
# The bf16 GPU tiles won bench/gpu_kernels.py's tile sweep on an H200 (figures in bench/results/).
GPU_TILES: Tiles = {"fwd": (64, 32, 4), "dkdv": (32, 64, 4), "dq": (32, 32, 4)}
GPU_TILES_FP32: Tiles = {"fwd": (64, 32, 4), "dkdv": (32, 32, 4), "dq": (32, 16, 4)}
INTERPRET_TILES: Tiles = {"fwd": (16, 16, 4), "dkdv": (16, 16, 4), "dq": (16, 16, 4)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_index() -> None:
    """Let the interpreter use a scalar tensor as a loop bound under NumPy >= 2.4 (triton-lang/triton#9171).

    Triton 3.6's interpreter converts scalars with int() of a one-element array, which NumPy 2.4 refuses; the
    upstream fix squeezes first, and so does this wrapper. Only the interpreter is touched, and only once.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_adsfm_fixed", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._adsfm_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if interpreting():
    _fix_interpreter_index()


def _empty_like(x: Tensor) -> Tensor:
    # A seam for tests, which fill with NaN to prove every row is written.
    return torch.empty_like(x)


@triton.jit
def _mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation; UPCAST feeds it float32 copies (for the interpreter, whose dot reads
    bfloat16 storage as integers). Operands are already rounded to their dtype, so the product is the same."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _time_bucket(dt, NT: tl.constexpr):
    """#{k in 0..NT-2 : dt >= 4**k} for int64 dt >= 0, exactly, without a loop over thresholds.

    floor(log2(dt)) comes from the float32 exponent; rounding to nearest can only overshoot it by one, which the
    integer shift test takes back. With NT <= 17 every threshold is below 2**31, so dt saturates to int32 first
    (half the registers of the [BLOCK, BLOCK] tile, and the same bucket).
    """
    if NT <= 17:
        d = tl.minimum(dt, 2147483647).to(tl.int32)
        top = 30
    else:
        d = dt
        top = 62
    f = d.to(tl.float32)
    e = ((f.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, 0), top).to(d.dtype)
    e = tl.where((d >> e) == 0, e - 1, e)
    return tl.where(d == 0, 0, tl.minimum(e // 2 + 1, NT - 1)).to(tl.int32)


@triton.jit
def _bias(p_i, offs_n, t_i, t_j, POS_W, TS_W, P, NT: tl.constexpr):
    """Bias tile for rows at positions p_i against history keys offs_n (whose position is their index)."""
    pb = tl.minimum(tl.maximum(p_i[:, None] - offs_n[None, :], 0), P - 1)
    dt = t_i[:, None] - t_j[None, :]
    tb = _time_bucket(tl.where(dt < 0, -dt, dt), NT)
    return tl.load(POS_W + pb) + tl.load(TS_W + tb), pb, tb


@triton.jit
def _seq(SEQ_OFF, NUM_TGT, b):
    """(first row as int64, length, history length) of sequence b (lengths are int32: see the host check)."""
    start = tl.load(SEQ_OFF + b)
    n = (tl.load(SEQ_OFF + b + 1) - start).to(tl.int32)
    n_hist = n - tl.load(NUM_TGT + b).to(tl.int32)
    return start, n, n_hist


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, SEQ_OFF, NUM_TGT, TS, POS_W, TS_W,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    alpha, inv_norm, P,
    DQK: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start, n, n_hist = _seq(SEQ_OFF, NUM_TGT, b)
    m0 = pid_m * BLOCK_M
    if m0 >= n:
        return
    # int64 only in these per-(sequence, head) base pointers; tile offsets within a sequence are int32.
    Q += start * stride_qt + h * stride_qh
    K += start * stride_kt + h * stride_kh
    V += start * stride_vt + h * stride_vh
    OUT += start * stride_ot + h * stride_oh
    TS += start

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n
    dqk_ok = offs_dqk < DQK
    dv_ok = offs_dv < DV
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_dqk[None, :], mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
    t_i = tl.load(TS + offs_m, mask=row_ok, other=0)
    p_i = tl.minimum(offs_m, n_hist)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # History keys only: j < n_hist, and j <= i bounds them by the block's last row.
    hi = tl.minimum(m0 + BLOCK_M, n_hist)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_dqk[None, :], mask=col_ok[:, None] & dqk_ok[None, :],
                    other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_dv[None, :], mask=col_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        t_j = tl.load(TS + offs_n, mask=col_ok, other=0)
        bias, _pb, _tb = _bias(p_i, offs_n, t_i, t_j, POS_W, TS_W, P, NT)
        s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * alpha + bias
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        a = tl.where(allowed, s * tl.sigmoid(s), 0.0)
        acc += _mma(a.to(v.dtype), v, DOT_PREC, UPCAST)

    if m0 + BLOCK_M > n_hist:
        # Candidate rows also see themselves: position gap 0, time gap 0.
        cand = row_ok & (offs_m >= n_hist)
        k_i = tl.load(K + offs_m[:, None] * stride_kt + offs_dqk[None, :], mask=cand[:, None] & dqk_ok[None, :],
                      other=0.0).to(tl.float32)
        v_i = tl.load(V + offs_m[:, None] * stride_vt + offs_dv[None, :], mask=cand[:, None] & dv_ok[None, :],
                      other=0.0).to(tl.float32)
        s_ii = tl.sum(q.to(tl.float32) * k_i, axis=1) * alpha + tl.load(POS_W) + tl.load(TS_W)
        acc += tl.where(cand, s_ii * tl.sigmoid(s_ii), 0.0)[:, None] * v_i

    tl.store(OUT + offs_m[:, None] * stride_ot + offs_dv[None, :], (acc * inv_norm).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, SEQ_OFF, NUM_TGT, TS, POS_W, TS_W,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    alpha, inv_norm, P,
    DQK: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start, n, n_hist = _seq(SEQ_OFF, NUM_TGT, b)
    n0 = pid_n * BLOCK_N
    # History keys only: a candidate key is seen by itself alone, and the dq kernel writes its dk, dv.
    if n0 >= n_hist:
        return
    # dk, dv share k's, v's layouts (contiguous copies made on the host).
    Q += start * stride_qt + h * stride_qh
    K += start * stride_kt + h * stride_kh
    V += start * stride_vt + h * stride_vh
    DO += start * stride_dot + h * stride_doh
    DK += start * stride_kt + h * stride_kh
    DV_ += start * stride_vt + h * stride_vh
    TS += start

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    hist_key = offs_n < n_hist
    dqk_ok = offs_dqk < DQK
    dv_ok = offs_dv < DV
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_dqk[None, :], mask=hist_key[:, None] & dqk_ok[None, :],
                other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_dv[None, :], mask=hist_key[:, None] & dv_ok[None, :],
                other=0.0)
    t_j = tl.load(TS + offs_n, mask=hist_key, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # History key j is seen by rows j..n_hist-1 and by every candidate.
    for m0 in range((n0 // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_dqk[None, :], mask=row_ok[:, None] & dqk_ok[None, :],
                    other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        t_i = tl.load(TS + offs_m, mask=row_ok, other=0)
        p_i = tl.minimum(offs_m, n_hist)
        bias, _pb, _tb = _bias(p_i, offs_n, t_i, t_j, POS_W, TS_W, P, NT)
        s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * alpha + bias
        allowed = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None] & hist_key[None, :]
        sig = tl.sigmoid(s)
        a = tl.where(allowed, s * sig, 0.0)
        dv += _mma(tl.trans(a).to(do.dtype), do, DOT_PREC, UPCAST)
        da = _mma(do, tl.trans(v), DOT_PREC, UPCAST) * inv_norm
        ds = tl.where(allowed, da * sig * (1.0 + s * (1.0 - sig)), 0.0)
        dk += _mma(tl.trans(ds).to(q.dtype), q, DOT_PREC, UPCAST)
    dk = dk * alpha
    dv = dv * inv_norm

    tl.store(DK + offs_n[:, None] * stride_kt + offs_dqk[None, :], dk.to(DK.dtype.element_ty),
             mask=hist_key[:, None] & dqk_ok[None, :])
    tl.store(DV_ + offs_n[:, None] * stride_vt + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=hist_key[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, DK, DV_, DPOS, DTS, SEQ_OFF, NUM_TGT, TS, POS_W, TS_W,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    alpha, inv_norm, P,
    DQK: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr, NT_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start, n, n_hist = _seq(SEQ_OFF, NUM_TGT, b)
    m0 = pid_m * BLOCK_M
    if m0 >= n:
        return
    Q += start * stride_qt + h * stride_qh
    K += start * stride_kt + h * stride_kh
    V += start * stride_vt + h * stride_vh
    DO += start * stride_dot + h * stride_doh
    DQ += start * stride_qt + h * stride_qh
    DK += start * stride_kt + h * stride_kh
    DV_ += start * stride_vt + h * stride_vh
    TS += start

    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    offs_m = m0 + r
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n
    dqk_ok = offs_dqk < DQK
    dv_ok = offs_dv < DV
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_dqk[None, :], mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                 other=0.0)
    t_i = tl.load(TS + offs_m, mask=row_ok, other=0)
    p_i = tl.minimum(offs_m, n_hist)
    hist_row = offs_m < n_hist
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    nt_idx = tl.arange(0, NT_PAD)
    d_ts = tl.zeros([NT_PAD], dtype=tl.float32)
    d_pos_last = tl.sum(tl.zeros([BLOCK_M], dtype=tl.float32), axis=0)  # gradient of bucket P - 1
    # Skewing index: row r of the tile is rotated left by r, so after the gather column c holds the entries
    # with i - j = m0 - n0 - c + w * BLOCK_N, w = (r + c) // BLOCK_N the number of times the rotation wrapped.
    skew = (r[:, None] + c[None, :]) % BLOCK_N
    wraps = (r[:, None] + c[None, :]) // BLOCK_N

    hi = tl.minimum(m0 + BLOCK_M, n_hist)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + c
        col_ok = offs_n < hi
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_dqk[None, :], mask=col_ok[:, None] & dqk_ok[None, :],
                    other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_dv[None, :], mask=col_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        t_j = tl.load(TS + offs_n, mask=col_ok, other=0)
        bias, pb, tb = _bias(p_i, offs_n, t_i, t_j, POS_W, TS_W, P, NT)
        s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * alpha + bias
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        sig = tl.sigmoid(s)
        da = _mma(do, tl.trans(v), DOT_PREC, UPCAST) * inv_norm
        ds = tl.where(allowed, da * sig * (1.0 + s * (1.0 - sig)), 0.0)
        dq += _mma(ds.to(k.dtype), k, DOT_PREC, UPCAST)

        for kk in tl.static_range(NT):
            d_ts += tl.where(nt_idx == kk, tl.sum(tl.sum(tl.where(tb == kk, ds, 0.0), axis=1), axis=0), 0.0)
        last = pb == P - 1
        d_pos_last += tl.sum(tl.sum(tl.where(last, ds, 0.0), axis=1), axis=0)
        ds_pos = tl.where(last, 0.0, ds)
        # History rows: p_i - j = i - j, the smallest in the tile is m0 - n0 - (BLOCK_N - 1).
        if (m0 < n_hist) & (m0 - n0 - (BLOCK_N - 1) < P - 1):
            rot = tl.gather(tl.where(hist_row[:, None], ds_pos, 0.0), skew, 1)
            for w in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_N + 1):
                d_w = m0 - n0 - c + w * BLOCK_N
                g_w = tl.sum(tl.where(wraps == w, rot, 0.0), axis=0)
                tl.atomic_add(DPOS + d_w, g_w, mask=(d_w >= 0) & (d_w < P - 1), sem="relaxed")
        # Candidate rows: every one sits at position n_hist, so the bucket depends on the column only.
        if (m0 + BLOCK_M > n_hist) & (n_hist - n0 - (BLOCK_N - 1) < P - 1):
            g_col = tl.sum(tl.where(hist_row[:, None], 0.0, ds_pos), axis=0)
            d_col = n_hist - offs_n
            tl.atomic_add(DPOS + d_col, g_col, mask=col_ok & (d_col >= 0) & (d_col < P - 1), sem="relaxed")
    dq = dq * alpha

    if m0 + BLOCK_M > n_hist:
        # Candidate rows' diagonal: it adds to their dq, and is all of their dk and dv (no other row sees them).
        cand = row_ok & (offs_m >= n_hist)
        k_i = tl.load(K + offs_m[:, None] * stride_kt + offs_dqk[None, :], mask=cand[:, None] & dqk_ok[None, :],
                      other=0.0)
        v_i = tl.load(V + offs_m[:, None] * stride_vt + offs_dv[None, :], mask=cand[:, None] & dv_ok[None, :],
                      other=0.0)
        s_ii = tl.sum(q.to(tl.float32) * k_i.to(tl.float32), axis=1) * alpha + tl.load(POS_W) + tl.load(TS_W)
        sig_ii = tl.sigmoid(s_ii)
        da_ii = tl.sum(do.to(tl.float32) * v_i.to(tl.float32), axis=1) * inv_norm
        ds_ii = tl.where(cand, da_ii * sig_ii * (1.0 + s_ii * (1.0 - sig_ii)), 0.0)
        dq += (ds_ii * alpha)[:, None] * k_i.to(tl.float32)
        dk_i = (ds_ii * alpha)[:, None] * q.to(tl.float32)
        tl.store(DK + offs_m[:, None] * stride_kt + offs_dqk[None, :], dk_i.to(DK.dtype.element_ty),
                 mask=cand[:, None] & dqk_ok[None, :])
        dv_i = (s_ii * sig_ii * inv_norm)[:, None] * do.to(tl.float32)
        tl.store(DV_ + offs_m[:, None] * stride_vt + offs_dv[None, :], dv_i.to(DV_.dtype.element_ty),
                 mask=cand[:, None] & dv_ok[None, :])
        diag = tl.sum(ds_ii, axis=0)
        d_ts += tl.where(nt_idx == 0, diag, 0.0)
        if P == 1:
            d_pos_last += diag
        else:
            tl.atomic_add(DPOS, diag, sem="relaxed")

    tl.store(DQ + offs_m[:, None] * stride_qt + offs_dqk[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & dqk_ok[None, :])
    tl.atomic_add(DTS + nt_idx, d_ts, mask=nt_idx < NT, sem="relaxed")
    tl.atomic_add(DPOS + P - 1, d_pos_last, sem="relaxed")


def _dot_precision(dtype: torch.dtype) -> str:
    # Follow torch's float32 matmul setting. "highest" (torch's default) gets 3xTF32, whose error is close to
    # float32's (plain IEEE float32 dots run on CUDA cores and spill registers); otherwise one TF32 pass, as
    # torch.matmul then does.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _constexprs(q: Tensor, v: Tensor, nt: int) -> dict[str, Any]:
    block_dqk = max(16, triton.next_power_of_2(q.shape[-1]))  # tl.dot needs every dimension >= 16
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    return {
        "DQK": q.shape[-1], "DV": v.shape[-1], "NT": nt, "BLOCK_DQK": block_dqk, "BLOCK_DV": block_dv,
        "DOT_PREC": _dot_precision(q.dtype),
        "UPCAST": interpreting() and q.dtype == torch.bfloat16,
        "num_stages": 2,
    }


def default_tiles(dtype: torch.dtype) -> Tiles:
    if interpreting():
        return INTERPRET_TILES
    return GPU_TILES_FP32 if dtype == torch.float32 else GPU_TILES


def _launch(launch: Callable[[int, int, int], None], kernel: str, tiles: Tiles | None, dtype: torch.dtype) -> None:
    """Run ``launch(BLOCK_M, BLOCK_N, num_warps)``, halving the tiles while shared memory runs out.

    Triton raises OutOfResources before the kernel starts, so a retry never doubles an atomic accumulation.
    Explicitly requested tiles are not changed.
    """
    bm, bn, warps = (tiles or default_tiles(dtype))[kernel]
    while True:
        try:
            launch(bm, bn, warps)
            return
        except OutOfResources:
            if tiles is not None or min(bm, bn) <= 16:
                raise
            bm, bn = bm // 2, bn // 2


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor, timestamps: Tensor,
        pos_w: Tensor, ts_w: Tensor, max_seq_len: int, alpha: float, norm: float, tiles: Tiles | None,
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        offsets = seq_offsets.to(torch.int64).contiguous()
        targets = num_targets.to(torch.int64).contiguous()
        ts = timestamps.to(torch.int64).contiguous()
        pw = pos_w.detach().to(torch.float32).contiguous()
        tw = ts_w.detach().to(torch.float32).contiguous()
        T, H, _ = q.shape
        B = offsets.numel() - 1
        out = _empty_like(v.new_empty((T, H, v.shape[-1]), dtype=q.dtype))
        if T > 0 and B > 0 and max_seq_len > 0:
            cx = _constexprs(q, v, tw.numel())

            def launch(bm: int, bn: int, warps: int) -> None:
                _fwd_kernel[(triton.cdiv(max_seq_len, bm), B, H)](
                    q, k, v, out, offsets, targets, ts, pw, tw,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    out.stride(0), out.stride(1), float(alpha), 1.0 / float(norm), pw.numel(),
                    BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **cx,
                )

            _launch(launch, "fwd", tiles, q.dtype)
        ctx.save_for_backward(q, k, v, offsets, targets, ts, pw, tw)
        ctx.meta = (max_seq_len, float(alpha), float(norm), tiles, pos_w.dtype, ts_w.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, offsets, targets, ts, pw, tw = ctx.saved_tensors
        max_seq_len, alpha, norm, tiles, pos_dtype, ts_dtype = ctx.meta
        do = grads[0].contiguous()
        T, H, _ = q.shape
        B = offsets.numel() - 1
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        dpos = torch.zeros_like(pw)
        dts = torch.zeros_like(tw)
        if T > 0 and B > 0 and max_seq_len > 0:
            strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       do.stride(0), do.stride(1))
            scalars = (alpha, 1.0 / norm, pw.numel())
            cx = _constexprs(q, v, tw.numel())

            def launch_dkdv(bm: int, bn: int, warps: int) -> None:
                _bwd_dkdv_kernel[(triton.cdiv(max_seq_len, bn), B, H)](
                    q, k, v, do, dk, dv, offsets, targets, ts, pw, tw, *strides, *scalars,
                    BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **cx,
                )

            def launch_dq(bm: int, bn: int, warps: int) -> None:
                _bwd_dq_kernel[(triton.cdiv(max_seq_len, bm), B, H)](
                    q, k, v, do, dq, dk, dv, dpos, dts, offsets, targets, ts, pw, tw, *strides, *scalars,
                    NT_PAD=triton.next_power_of_2(tw.numel()), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **cx,
                )

            _launch(launch_dkdv, "dkdv", tiles, q.dtype)
            _launch(launch_dq, "dq", tiles, q.dtype)
        return dq, dk, dv, None, None, None, dpos.to(pos_dtype), dts.to(ts_dtype), None, None, None, None


def hstu_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor,
    timestamps: Tensor,
    pos_w: Tensor,
    ts_w: Tensor,
    max_seq_len: int,
    alpha: float,
    norm: float,
    tiles: Tiles | None = None,
) -> Tensor:
    """HSTU attention by the Triton kernels (same contract as hstu_attention_reference), differentiable.

    ``tiles`` fixes each kernel's (BLOCK_M, BLOCK_N, num_warps); by default ``default_tiles(q.dtype)``, halved
    while shared memory runs out. Lengths above ``max_seq_len`` are not checked
    on a device (that would sync): their trailing rows would not be computed.
    """
    from adsfm.parallel.kernels.hstu_attention import _check_shapes

    _check_shapes(q, k, v, seq_offsets, num_targets, timestamps, pos_w, ts_w, max_seq_len)
    # Offsets inside one sequence are int32 in the kernels (only the per-sequence base is int64).
    if max_seq_len * max(q.shape[1] * q.shape[2], v.shape[1] * v.shape[2]) >= 2**31:
        raise ValueError("hstu_attention_triton: max_seq_len * heads * head dim must stay below 2**31")
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"hstu_attention_triton: q, k, v all float32 or all bfloat16, got {q.dtype, k.dtype, v.dtype}")
    if not q.is_cuda and not interpreting():
        raise RuntimeError("hstu_attention_triton on CPU tensors needs TRITON_INTERPRET=1 set before Triton loads")
    out: Tensor = _HSTUAttention.apply(
        q, k, v, seq_offsets, num_targets, timestamps, pos_w, ts_w, max_seq_len, alpha, norm, tiles
    )
    return out
