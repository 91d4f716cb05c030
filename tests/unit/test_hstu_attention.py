"""HSTU attention: the PyTorch reference against a dense float64 oracle, and Triton (interpreted) against both.

The oracle below is written from the formulas in parallel/kernels/hstu_attention.py's docstring with its own
bucket arithmetic on Python ints, one sequence at a time, so that it shares no code with the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from adsfm.parallel.kernels import (
    ERROR_BOUNDS,
    hstu_attention,
    hstu_attention_reference,
    position_bucket,
    time_bucket,
    triton_available,
)

BASE_TS = 1_700_000_000
LEAVES = ["q", "k", "v", "pos_w", "ts_w"]


@dataclass
class Case:
    q: Tensor
    k: Tensor
    v: Tensor
    seq_offsets: Tensor
    num_targets: Tensor
    timestamps: Tensor
    pos_w: Tensor
    ts_w: Tensor
    max_seq_len: int
    alpha: float
    norm: float

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.seq_offsets, self.num_targets, self.timestamps,
                self.pos_w, self.ts_w, self.max_seq_len, self.alpha, self.norm)

    def leaves(self) -> list[Tensor]:
        return [self.q, self.k, self.v, self.pos_w, self.ts_w]


def make_case(
    gen: torch.Generator, lengths: list[int], targets: list[int], H: int = 2, Dqk: int = 8, Dv: int = 4,
    P: int = 6, NT: int = 8, dtype: torch.dtype = torch.float64,
) -> Case:
    """Random jagged inputs; timestamps near 1e9 spread over every time bucket, with repeats."""
    T = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    # Offsets of 4**u seconds for u uniform in [0, NT) reach every bucket; exact powers of 4 (and one less) put
    # gaps on the bucket edges; offset 0 is frequent, so equal timestamps are too.
    u = torch.randint(0, NT, (T,), generator=gen)
    spread = (4.0 ** (torch.rand(T, generator=gen, dtype=torch.float64) * NT)).long()
    kind = torch.randint(0, 4, (T,), generator=gen)
    offset = torch.where(kind == 0, spread, torch.where(kind == 1, 4**u, torch.where(kind == 2, 4**u - 1, 0)))
    timestamps = BASE_TS + offset

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return Case(
        q=rnd(T, H, Dqk), k=rnd(T, H, Dqk), v=rnd(T, H, Dv),
        seq_offsets=offsets, num_targets=torch.tensor(targets, dtype=torch.int64), timestamps=timestamps,
        pos_w=rnd(P, scale=0.5), ts_w=rnd(NT, scale=0.5),
        max_seq_len=max(lengths, default=0) + int(torch.randint(0, 3, (1,), generator=gen)),
        alpha=float(0.3 + torch.rand(1, generator=gen)), norm=float(1.0 + 3 * torch.rand(1, generator=gen)),
    )


def random_case(gen: torch.Generator, B: int, max_len: int, **kw: object) -> Case:
    """Ragged lengths with 0 and 1 always present (when B allows), targets covering 0 and == n."""
    lengths = torch.randint(0, max_len + 1, (B,), generator=gen).tolist()
    lengths[: min(B, 2)] = [0, 1][: min(B, 2)]
    targets = []
    for b, n in enumerate(lengths):
        mode = b % 4  # half the sequences draw their target count, the others pin it to 0 or n
        targets.append(0 if mode == 0 else n if mode == 1 else int(torch.randint(0, n + 1, (1,), generator=gen)))
    return make_case(gen, lengths, targets, **kw)  # type: ignore[arg-type]


def oracle(c: Case) -> Tensor:
    """Dense float64 HSTU attention, one sequence at a time, straight from the formulas."""
    q, k, v = c.q.double(), c.k.double(), c.v.double()
    pos_w, ts_w = c.pos_w.double(), c.ts_w.double()
    P, NT = pos_w.numel(), ts_w.numel()
    outs = []
    offs = c.seq_offsets.tolist()
    for b in range(len(offs) - 1):
        s, e = offs[b], offs[b + 1]
        n = e - s
        n_hist = n - int(c.num_targets[b])
        ts = [int(t) for t in c.timestamps[s:e]]
        pidx = torch.zeros(n, n, dtype=torch.long)
        tidx = torch.zeros(n, n, dtype=torch.long)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                d = min(i, n_hist) - min(j, n_hist)
                pidx[i, j] = max(0, min(d, P - 1))
                dt = abs(ts[i] - ts[j])
                tidx[i, j] = sum(1 for kk in range(NT - 1) if dt >= 4**kk)
                mask[i, j] = j <= i and (j < n_hist or j == i)
        scores = c.alpha * torch.einsum("ihd,jhd->hij", q[s:e], k[s:e]) + (pos_w[pidx] + ts_w[tidx])
        weights = torch.nn.functional.silu(scores) * mask
        outs.append(torch.einsum("hij,jhd->ihd", weights, v[s:e]) / c.norm)
    if not outs:
        return v.new_zeros(v.shape)
    return torch.cat(outs)


def grads(out: Tensor, g: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=False))


def rel_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values (an output row never written?)"
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


# ---------------------------------------------------------------- buckets


def test_buckets_match_definitions() -> None:
    d = torch.arange(-5, 40)
    assert torch.equal(position_bucket(d, 7), torch.tensor([max(0, min(x, 6)) for x in d.tolist()]))
    assert position_bucket(d, 7).dtype == torch.int64
    edges = [0, 1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 4**15 - 1, 4**15, 4**20, 2**62]
    dt = torch.tensor(edges + [-x for x in edges], dtype=torch.int64)
    for nt in (1, 2, 5, 17, 33):
        want = [sum(1 for kk in range(nt - 1) if abs(x) >= 4**kk) for x in dt.tolist()]
        got = time_bucket(dt, nt)
        assert got.dtype == torch.int64 and got.tolist() == want, nt
    with pytest.raises(TypeError):
        time_bucket(dt.double(), 8)
    with pytest.raises(ValueError):
        time_bucket(dt, 34)


def test_time_bucket_int64_precision() -> None:
    # One second apart at 1.7e9: the gap is 1 (bucket 1), which float32 subtraction would report as 0.
    t = torch.tensor([BASE_TS, BASE_TS + 1, BASE_TS + 16 - 1], dtype=torch.int64)
    assert time_bucket(t - t[0], 8).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- reference vs oracle


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_oracle_fwd_bwd(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = random_case(gen, B=7, max_len=9, H=2, Dqk=6, Dv=5, P=int(torch.randint(2, 12, (1,), generator=gen)),
                    NT=int(torch.randint(1, 12, (1,), generator=gen)))
    out = hstu_attention_reference(*c.args())
    want = oracle(c)
    assert out.shape == want.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for name, got, exp in zip(LEAVES, grads(out, g, c.leaves()), grads(want, g, c.leaves()),
                              strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


def test_reference_float32_and_bf16() -> None:
    gen = torch.Generator().manual_seed(11)
    c = random_case(gen, B=4, max_len=8, dtype=torch.float32)
    out = hstu_attention_reference(*c.args())
    assert out.dtype == torch.float32
    assert rel_err(out, oracle(c)) < 1e-6
    cb = Case(**{**c.__dict__, **{n: getattr(c, n).detach().bfloat16().requires_grad_() for n in ("q", "k", "v")}})
    outb = hstu_attention_reference(*cb.args())
    assert outb.dtype == torch.bfloat16
    assert rel_err(outb, oracle(cb)) < 1e-2


def test_reference_edge_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    empty = make_case(gen, [], [])  # B == 0, T == 0
    assert hstu_attention_reference(*empty.args()).shape == (0, 2, 4)
    zeros = make_case(gen, [0, 0, 0], [0, 0, 0])  # T == 0 with B > 0
    out = hstu_attention_reference(*zeros.args())
    assert out.shape == (0, 2, 4)
    out.sum().backward()  # backward through empty tensors must not fail either
    single = make_case(gen, [1], [1])  # one candidate and no history: only itself
    torch.testing.assert_close(hstu_attention_reference(*single.args()), oracle(single))


def test_reference_rejects_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(4)
    c = make_case(gen, [3, 5], [1, 2])
    with pytest.raises(ValueError, match="max_seq_len"):
        hstu_attention_reference(*c.args()[:8], 4, c.alpha, c.norm)
    bad = Case(**{**c.__dict__, "num_targets": torch.tensor([4, 0])})
    with pytest.raises(ValueError, match="num_targets"):
        hstu_attention_reference(*bad.args())


def test_candidate_order_invariance() -> None:
    """Permuting a sequence's candidates (rows with their timestamps) permutes its outputs, nothing else."""
    gen = torch.Generator().manual_seed(5)
    c = make_case(gen, [7, 9, 4], [3, 5, 4])
    out = hstu_attention_reference(*c.args()).detach()
    perm = torch.arange(c.q.shape[0])
    s, e, m = 7, 16, 5  # the second sequence's candidates are rows e-m..e-1
    perm[e - m : e] = e - m + torch.randperm(m, generator=gen)
    assert not torch.equal(perm, torch.arange(c.q.shape[0]))
    pc = Case(**{**c.__dict__, "q": c.q[perm], "k": c.k[perm], "v": c.v[perm], "timestamps": c.timestamps[perm]})
    out_p = hstu_attention_reference(*pc.args()).detach()
    torch.testing.assert_close(out_p, out[perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[perm][s:e], out[s:e])  # the permutation really moved distinct rows


def test_dispatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(6)
    c = make_case(gen, [3, 2], [1, 0])
    monkeypatch.setenv("ADSFM_HSTU_KERNEL", "reference")
    torch.testing.assert_close(hstu_attention(*c.args()), hstu_attention_reference(*c.args()))
    monkeypatch.setenv("ADSFM_HSTU_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ADSFM_HSTU_KERNEL"):
        hstu_attention(*c.args())
    monkeypatch.delenv("ADSFM_HSTU_KERNEL")
    torch.testing.assert_close(hstu_attention(*c.args()), hstu_attention_reference(*c.args()))  # CPU: reference
    with pytest.raises(ValueError, match="attention_kernel"):
        hstu_attention(*c.args(), kernel="bogus")


# ---------------------------------------------------------------- Triton (interpreted on CPU)

needs_triton = pytest.mark.skipif(
    not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton, interpreted (tests/conftest.py sets TRITON_INTERPRET=1 before triton loads, on machines "
    "without a GPU; with one, tests/gpu run the compiled kernels)",
)


@pytest.fixture
def triton_mod(monkeypatch: pytest.MonkeyPatch) -> object:
    """parallel.kernels.hstu_triton with outputs and gradients allocated full of NaN, so an unwritten row fails."""
    from adsfm.parallel.kernels import hstu_triton  # tests that take this fixture are all marked needs_triton

    monkeypatch.setattr(hstu_triton, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    return hstu_triton


def upcast(c: Case) -> Case:
    """The same inputs, as float64 leaves: the reference run on them is the ground truth for the kernel."""
    return Case(**{**c.__dict__, **{n: getattr(c, n).detach().double().requires_grad_() for n in LEAVES}})


def check_triton(hstu_triton: object, c: Case, tiles: dict[str, tuple[int, int, int]] | None = None) -> dict[str, float]:
    out = hstu_triton.hstu_attention_triton(*c.args(), tiles=tiles)  # type: ignore[attr-defined]
    assert out.dtype == c.q.dtype and out.shape == c.v.shape
    ref_c = upcast(c)
    ref = hstu_attention_reference(*ref_c.args())
    # The incoming gradient is an input too: both sides get the same values, rounded to the output's dtype.
    gen = torch.Generator().manual_seed(out.numel())
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).double()
    errs = {"out": rel_err(out, ref)}
    for name, got, exp in zip(LEAVES, grads(out, g, c.leaves()), grads(ref, g, ref_c.leaves()), strict=True):
        assert got.dtype == getattr(c, name).dtype
        errs[name] = rel_err(got, exp)
    fwd_bound, bwd_bound = ERROR_BOUNDS[c.q.dtype]  # documented in parallel/kernels/hstu_attention.py
    assert errs["out"] <= fwd_bound, errs
    assert all(e <= bwd_bound for n, e in errs.items() if n != "out"), errs
    return errs


# Square and oblong tiles: the dq kernel's diagonal reduction wraps once to four times across a key tile.
TILE_SETS = [
    None,
    {"fwd": (32, 16, 4), "dkdv": (16, 32, 4), "dq": (32, 16, 4)},
    {"fwd": (16, 32, 4), "dkdv": (32, 16, 4), "dq": (16, 32, 4)},
    {"fwd": (16, 16, 4), "dkdv": (16, 16, 4), "dq": (64, 16, 4)},
]


@needs_triton
@pytest.mark.parametrize("seed", range(4))
def test_triton_matches_reference_fp32(triton_mod: object, seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    # Lengths over several tiles; P from 1 (everything clamped) to past the longest gap; NT from 1 to past 17
    # (the kernel's int64 time-bucket path).
    c = random_case(gen, B=6, max_len=45, H=2, Dqk=[8, 12, 16, 20][seed], Dv=[12, 8, 16, 4][seed],
                    P=[1, 5, 30, 64][seed], NT=[1, 4, 20, 16][seed], dtype=torch.float32)
    check_triton(triton_mod, c, TILE_SETS[seed])


@needs_triton
def test_triton_matches_reference_bf16(triton_mod: object) -> None:
    gen = torch.Generator().manual_seed(200)
    c = random_case(gen, B=5, max_len=40, H=2, Dqk=16, Dv=16, P=20, NT=10, dtype=torch.bfloat16)
    check_triton(triton_mod, c)


@needs_triton
def test_triton_block_boundaries_and_edges(triton_mod: object) -> None:
    gen = torch.Generator().manual_seed(300)
    # Lengths on and beside tile edges, history ending exactly on a tile edge, all-candidate and no-candidate.
    c = make_case(gen, [16, 17, 32, 33, 1, 0, 31], [0, 1, 16, 17, 1, 0, 31], H=3, Dqk=16, Dv=16, P=40, NT=12,
                  dtype=torch.float32)
    check_triton(triton_mod, c, TILE_SETS[1])
    for empty in (make_case(gen, [], [], dtype=torch.float32), make_case(gen, [0, 0], [0, 0], dtype=torch.float32)):
        out = triton_mod.hstu_attention_triton(*empty.args())  # type: ignore[attr-defined]
        assert out.shape == (0, 2, 4)
        dq, dpos = torch.autograd.grad(out.sum(), [empty.q, empty.pos_w], allow_unused=True)
        assert dq.shape == empty.q.shape and torch.equal(dpos, torch.zeros_like(empty.pos_w))


@needs_triton
def test_dispatch_forces_triton(triton_mod: object, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = triton_mod.hstu_attention_triton  # type: ignore[attr-defined]

    def spy(*args: object) -> Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(triton_mod, "hstu_attention_triton", spy)
    c = make_case(torch.Generator().manual_seed(400), [5, 3], [2, 0], dtype=torch.float32)
    # chosen by argument (model.sequence.attention_kernel) ...
    torch.testing.assert_close(hstu_attention(*c.args(), kernel="triton"), hstu_attention_reference(*c.args()))
    assert calls == [1]
    # ... and the environment variable overrides the argument
    monkeypatch.setenv("ADSFM_HSTU_KERNEL", "triton")
    torch.testing.assert_close(hstu_attention(*c.args(), kernel="reference"), hstu_attention_reference(*c.args()))
    assert calls == [1, 1]


if triton_available():
    import triton
    import triton.language as tl

    from adsfm.parallel.kernels.hstu_triton import _time_bucket

    @triton.jit
    def _time_bucket_kernel(DT, OUT, n, NT: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.arange(0, BLOCK)
        dt = tl.load(DT + offs, mask=offs < n, other=0)
        tl.store(OUT + offs, _time_bucket(dt, NT), mask=offs < n)


@needs_triton
def test_triton_time_bucket_exact_at_edges(triton_mod: object) -> None:
    """The kernel's float-exponent bucketing equals the integer definition on every 4**k edge up to int64 max."""
    edges = sorted({max(0, 4**kk + e) for kk in range(32) for e in (-1, 0, 1)} | {0, 2**62 - 1, 2**63 - 1})
    dt = torch.tensor(edges, dtype=torch.int64)
    for nt in (1, 2, 16, 33):
        out = torch.full_like(dt, -1)
        _time_bucket_kernel[(1,)](dt, out, dt.numel(), NT=nt, BLOCK=triton.next_power_of_2(dt.numel()))
        assert out.tolist() == time_bucket(dt, nt).tolist(), nt
