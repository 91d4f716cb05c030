"""HSTU pointwise jagged attention with M-FALCON candidate masking and a relative position/time bias.

Semantics (Zhai et al. 2024, "Actions Speak Louder than Words"; the contract every implementation here meets):

Jagged layout: B sequences; the rows of sequence b are ``seq_offsets[b]:seq_offsets[b+1]`` of tensors with T
rows in all. Sequence b has n rows, the last m = ``num_targets[b]`` of which are candidates (0 <= m <= n);
n_hist = n - m. For local row indices i, j (0-based within the sequence):

- effective position p_i = min(i, n_hist): every candidate sits at position n_hist, so a candidate's score
  does not depend on where it is in the candidate list;
- allowed(i, j) = (j <= i) and (j < n_hist or j == i): history is causal, a candidate sees the whole history
  and itself, never another candidate (so candidates can be scored in any batch split: M-FALCON);
- s_ij = alpha * <q_i, k_j> + pos_w[position_bucket(p_i - p_j, P)] + ts_w[time_bucket(|t_i - t_j|, NT)],
  one bias shared by all heads;
- out_i = sum over allowed j of silu(s_ij) * v_j / norm (pointwise: no softmax; j == i is always allowed);

with position_bucket(d, P) = clamp(d, 0, P - 1) and time_bucket(dt, NT) = #{k in 0..NT-2 : dt >= 4**k}
(0 for dt == 0, at most NT - 1). Time gaps are taken in int64: timestamps are seconds near 1e9, where float32
cannot even tell neighbouring seconds apart.

Implementations:

- ``hstu_attention_reference``: pure PyTorch (pad to [B, max_seq_len], batched matmuls, a boolean mask, gather
  back), differentiable by autograd; it is what CPU training runs.
- ``hstu_attention_triton`` (parallel/kernels/hstu_triton.py): FlashAttention-2 style forward and backward
  kernels over the jagged layout, bias computed in the kernel, fp32 accumulation.
- ``hstu_attention``: the Triton kernel for CUDA tensors when Triton imports, else the reference;
  ``ADSFM_HSTU_KERNEL=reference|triton`` forces one (Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set
  before Triton is first imported).

Error bounds of the Triton kernel against the reference evaluated in float64 on the same (upcast) inputs,
as relative Frobenius errors ||x - ref|| / ||ref|| over the whole output or gradient tensor (``ERROR_BOUNDS``;
asserted by tests/unit/test_hstu_attention.py under the interpreter, tests/gpu/test_hstu_triton.py on CUDA):

- float32 inputs: forward <= 1e-4, every gradient (q, k, v, pos_w, ts_w) <= 1e-3. This holds with torch's
  default float32 matmul precision ("highest"), under which the kernel's dots run as 3xTF32 (error near
  float32's); after ``torch.set_float32_matmul_precision("high")`` they are single TF32, as torch.matmul's
  then are, and errors grow to about TF32's 1e-3 (not covered by these bounds).
- bfloat16 inputs: forward <= 2e-2, every gradient <= 5e-2. Inputs, the output, the q/k/v gradients and the
  silu(s) tile fed to the second matmul are bfloat16 (unit roundoff 3.9e-3), accumulation is float32; about
  6e-3 is typical; pos_w/ts_w gradients are float32 sums of float32 score gradients (near 1e-6 when those
  tables are float32).

The incoming output gradient counts as an input: both sides get the same values, in the output's dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

# dtype -> (forward, every gradient): relative Frobenius error bounds of the Triton kernel (module docstring).
ERROR_BOUNDS: dict[torch.dtype, tuple[float, float]] = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}

# 4**k must fit int64: k <= 31, so NT - 2 <= 31.
MAX_TIME_BUCKETS = 33
KERNEL_ENV = "ADSFM_HSTU_KERNEL"


def position_bucket(d: Tensor, num_buckets: int) -> Tensor:
    """clamp(d, 0, num_buckets - 1) as int64: the relative-position bias index for position gap d."""
    if num_buckets < 1:
        raise ValueError(f"position_bucket: num_buckets must be >= 1, got {num_buckets}")
    return d.to(torch.int64).clamp(0, num_buckets - 1)


def _time_thresholds(num_buckets: int, device: torch.device) -> Tensor:
    if not 1 <= num_buckets <= MAX_TIME_BUCKETS:
        raise ValueError(
            f"time_bucket: num_buckets must be in 1..{MAX_TIME_BUCKETS} (4**(num_buckets-2) must fit int64), "
            f"got {num_buckets}"
        )
    return torch.tensor([4**k for k in range(num_buckets - 1)], dtype=torch.int64, device=device)


def time_bucket(dt: Tensor, num_buckets: int) -> Tensor:
    """#{k in 0..num_buckets-2 : |dt| >= 4**k} as int64, elementwise; dt must be an integer tensor.

    Written as a compare-and-count against constant thresholds so that torch.onnx.export (dynamo) traces it
    without data-dependent control flow.
    """
    if dt.is_floating_point():
        raise TypeError("time_bucket: dt must be an integer tensor (int64 seconds); float loses seconds at 1e9")
    thresholds = _time_thresholds(num_buckets, dt.device)
    return (dt.to(torch.int64).abs().unsqueeze(-1) >= thresholds).sum(-1)


def _time_bucket_fast(dt: Tensor, num_buckets: int) -> Tensor:
    """time_bucket without the [..., NT-1] comparison tensor (the reference's [B, N, N] gaps make it large)."""
    thresholds = _time_thresholds(num_buckets, dt.device)
    return torch.bucketize(dt.abs(), thresholds, right=True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_shapes(
    q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor, timestamps: Tensor,
    pos_w: Tensor, ts_w: Tensor, max_seq_len: int,
) -> None:
    T, H, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"hstu_attention: k {tuple(k.shape)} must match q {tuple(q.shape)}")
    if v.dim() != 3 or v.shape[:2] != (T, H):
        raise ValueError(f"hstu_attention: v {tuple(v.shape)} must be [T={T}, H={H}, Dv]")
    B = seq_offsets.numel() - 1
    if seq_offsets.dim() != 1 or B < 0:
        raise ValueError(f"hstu_attention: seq_offsets must be [B+1], got {tuple(seq_offsets.shape)}")
    if num_targets.shape != (B,):
        raise ValueError(f"hstu_attention: num_targets {tuple(num_targets.shape)} must be [B={B}]")
    if timestamps.shape != (T,):
        raise ValueError(f"hstu_attention: timestamps {tuple(timestamps.shape)} must be [T={T}]")
    if timestamps.is_floating_point():
        raise TypeError("hstu_attention: timestamps must be int64 seconds, not floating point")
    if pos_w.dim() != 1 or ts_w.dim() != 1 or pos_w.numel() < 1 or ts_w.numel() < 1:
        raise ValueError("hstu_attention: pos_w [P] and ts_w [NT] must be non-empty vectors")
    if max_seq_len < 0:
        raise ValueError(f"hstu_attention: max_seq_len must be >= 0, got {max_seq_len}")
    _time_thresholds(ts_w.numel(), torch.device("cpu"))
    # Offsets on the host cost nothing to check; on a device the check would be a sync, so it is skipped there.
    if seq_offsets.device.type == "cpu" and B > 0:
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        if int(seq_offsets[0]) != 0 or int(seq_offsets[-1]) != T or bool((lengths < 0).any()):
            raise ValueError("hstu_attention: seq_offsets must rise from 0 to T")
        if int(lengths.max()) > max_seq_len:
            raise ValueError(f"hstu_attention: a sequence has {int(lengths.max())} rows > max_seq_len={max_seq_len}")
        if bool(((num_targets < 0) | (num_targets > lengths)).any()):
            raise ValueError("hstu_attention: num_targets must be in 0..length of each sequence")


class _BucketGather(torch.autograd.Function):
    """table[idx] whose backward sums the gradient per bucket with bincount: autograd's index backward is an
    accumulating index_put into a few dozen entries, where every score element contends for the same
    addresses (slow on CPU and worse on a GPU)."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.size = table.numel()
        return table[idx]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        weights = grad.reshape(-1)
        summed = torch.bincount(idx.reshape(-1), weights=weights.to(_compute_dtype(weights.dtype)), minlength=ctx.size)
        return summed.to(grad.dtype), None


def hstu_attention_reference(
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
) -> Tensor:
    """HSTU attention in plain PyTorch (semantics in the module docstring); autograd gives every gradient.

    q, k [T, H, Dqk]; v [T, H, Dv]; seq_offsets [B+1] int64; num_targets [B] int64; timestamps [T] int64;
    pos_w [P]; ts_w [NT]. ``max_seq_len`` bounds every sequence's length (a host int, so no device sync).
    Returns [T, H, Dv] in q's dtype; bf16/fp16 are computed in float32.
    """
    _check_shapes(q, k, v, seq_offsets, num_targets, timestamps, pos_w, ts_w, max_seq_len)
    T, H, _ = q.shape
    Dv = v.shape[-1]
    B = seq_offsets.numel() - 1
    N = max_seq_len
    dev = q.device
    cd = _compute_dtype(q.dtype)

    offsets = seq_offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    n_hist = lengths - num_targets.to(torch.int64)
    # Jagged row r -> padded slot seq*N + local; output_size keeps repeat_interleave free of a device sync.
    seq_of_row = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=T)
    local = torch.arange(T, device=dev) - offsets[:-1][seq_of_row]
    slot = seq_of_row * N + local

    def pad(x: Tensor) -> Tensor:  # [T, H, D] -> [B, H, N, D]
        out = x.new_zeros((B * N, *x.shape[1:])).index_copy(0, slot, x)
        return out.view(B, N, *x.shape[1:]).transpose(1, 2)

    qp, kp, vp = pad(q.to(cd)), pad(k.to(cd)), pad(v.to(cd))
    tp = timestamps.to(torch.int64).new_zeros(B * N).index_copy(0, slot, timestamps.to(torch.int64)).view(B, N)

    idx = torch.arange(N, device=dev)
    pos = torch.minimum(idx.unsqueeze(0), n_hist.unsqueeze(1))  # [B, N]
    pos_b = position_bucket(pos.unsqueeze(2) - pos.unsqueeze(1), pos_w.numel())  # [B, N, N]
    ts_b = _time_bucket_fast(tp.unsqueeze(2) - tp.unsqueeze(1), ts_w.numel())
    bias = _BucketGather.apply(pos_w.to(cd), pos_b) + _BucketGather.apply(ts_w.to(cd), ts_b)

    i, j = idx.view(1, N, 1), idx.view(1, 1, N)
    allowed = (j <= i) & ((j < n_hist.view(B, 1, 1)) | (j == i)) & (i < lengths.view(B, 1, 1))

    scores = torch.matmul(qp, kp.transpose(-1, -2)) * alpha + bias.unsqueeze(1)  # [B, H, N, N]
    weights = torch.where(allowed.unsqueeze(1), F.silu(scores), scores.new_zeros(()))
    out = torch.matmul(weights, vp) / norm  # [B, H, N, Dv]
    out = out.transpose(1, 2).reshape(B * N, H, Dv).index_select(0, slot)
    return out.to(q.dtype)


def triton_available() -> bool:
    """Whether Triton imports (the kernels module loads lazily, so the package works without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


KERNELS = ("auto", "reference", "triton")


def _choose_kernel(q: Tensor, kernel: str = "auto") -> str:
    """The configured kernel (model.sequence.attention_kernel), unless ADSFM_HSTU_KERNEL overrides it; auto is
    Triton for float32/bfloat16 CUDA tensors when Triton imports, else the reference."""
    forced = os.environ.get(KERNEL_ENV, "").strip().lower() or str(kernel)
    if forced not in KERNELS:
        raise ValueError(f"HSTU attention kernel must be one of {', '.join(KERNELS)}, got {forced!r} "
                         f"(model.sequence.attention_kernel, or {KERNEL_ENV})")
    if forced != "auto":
        return forced
    # float64 and float16 stay on the reference: the kernels are built and checked for float32 and bfloat16.
    supported = q.dtype in (torch.float32, torch.bfloat16)
    return "triton" if q.is_cuda and supported and triton_available() else "reference"


def hstu_attention(
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
    kernel: str = "auto",
) -> Tensor:
    """HSTU attention (module docstring): the one dispatcher, by `kernel` (auto: Triton on CUDA when available,
    else the PyTorch reference); ``ADSFM_HSTU_KERNEL=reference|triton`` overrides the argument."""
    if _choose_kernel(q, kernel) == "reference":
        return hstu_attention_reference(
            q, k, v, seq_offsets, num_targets, timestamps, pos_w, ts_w, max_seq_len, alpha, norm
        )
    from adsfm.parallel.kernels.hstu_triton import hstu_attention_triton

    return hstu_attention_triton(q, k, v, seq_offsets, num_targets, timestamps, pos_w, ts_w, max_seq_len, alpha, norm)
