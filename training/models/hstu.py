"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") as a ranking model: each candidate attends to the
user's whole history, never to other candidates (M-FALCON), so one forward scores many candidates.

Tokens: a history event is its item's embedding plus its action's (MovieLens: the rating); a candidate is
the sum of its item-side embeddings, a learned "to be predicted" action vector and a projection of the
user's single-valued features. Each layer is HSTU's: pointwise SiLU projections U, V, Q, K of the
normalised input, jagged pointwise attention with a relative bias from position and time gap
(parallel/kernels: Triton on CUDA, PyTorch on CPU), a per-head norm gated by U, an output projection and a
residual. The head reads each candidate's last hidden state.

The same weights also run as two graphs for serving (`UserSide`, `CandidateSide`): the history is encoded
once per user into each layer's keys and values, and candidates attend to that cached state. History rows
never attend to candidates, so the split computes exactly what the joint forward does.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from adsfm.contract.config import ModelConfig, SequenceModelConfig
from adsfm.contract.features import FeatureSpec
from adsfm.parallel.dense_plan import DensePlan
from adsfm.parallel.kernels import hstu_attention, position_bucket, time_bucket
from adsfm.training.models import features_by_table


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


class HSTULayer(nn.Module):
    """One HSTU block. Q, K, V, U are separate projections so tensor parallelism can split them by head
    (column-wise) and the output projection row-wise; head counts are read from the local width."""

    def __init__(self, dim: int, s: SequenceModelConfig, norm: float) -> None:
        super().__init__()
        h = s.num_heads
        self.attention_dim, self.linear_dim, self.norm_by = s.attention_dim, s.linear_dim, norm
        self.kernel = str(s.attention_kernel)
        self.alpha = s.attention_dim**-0.5
        self.input_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, h * s.attention_dim)
        self.k = nn.Linear(dim, h * s.attention_dim)
        self.v = nn.Linear(dim, h * s.linear_dim)
        self.u = nn.Linear(dim, h * s.linear_dim)
        self.out = nn.Linear(h * s.linear_dim, dim)
        # Relative bias shared by the heads; zeros at first so training starts from plain attention.
        self.position_bias = nn.Parameter(torch.zeros(s.position_buckets))
        self.time_bias = nn.Parameter(torch.zeros(s.time_buckets))
        self.dropout = nn.Dropout(s.dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [T, H*dl], q [T, H, da], k [T, H, da], v [T, H, dl]."""
        h = self.input_norm(x)
        q, k, v = F.silu(self.q(h)), F.silu(self.k(h)), F.silu(self.v(h))
        # Heads from the (local) width, never -1: an empty history must still reshape unambiguously.
        heads = q.shape[-1] // self.attention_dim
        n = x.shape[0]
        return (F.silu(self.u(h)), q.reshape(n, heads, self.attention_dim), k.reshape(n, heads, self.attention_dim),
                v.reshape(n, heads, self.linear_dim))

    def finish(self, x: torch.Tensor, attended: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Residual update from the attention output [T, H, dl]: per-head norm, gate by U, project back."""
        o = F.layer_norm(attended, (self.linear_dim,)).reshape(x.shape[0], -1)
        return x + self.dropout(self.out(o * u))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, num_targets: torch.Tensor, times: torch.Tensor,
                max_len: int) -> torch.Tensor:
        u, q, k, v = self.project(x)
        a = hstu_attention(q, k, v, offsets, num_targets, times, self.position_bias, self.time_bias, max_len,
                           self.alpha, self.norm_by, kernel=self.kernel)
        return self.finish(x, a, u)


class HSTUDense(nn.Module):
    """Everything but the tables: token assembly, the HSTU layers, the head."""

    def __init__(self, num_context: int, cfg: ModelConfig, norm: float) -> None:
        super().__init__()
        d, s = cfg.embedding_dim, cfg.sequence
        if cfg.over_arch[-1] != 1:
            raise ValueError(f"model.over_arch[-1]={cfg.over_arch[-1]}: the last layer must be 1 (one logit)")
        if s.num_layers < 1 or s.num_heads < 1:
            raise ValueError(f"model.sequence: num_layers({s.num_layers}) and num_heads({s.num_heads}) must be >= 1")
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.context = nn.Linear(max(num_context, 1) * d, d)
        self.layers = nn.ModuleList([HSTULayer(d, s, norm) for _ in range(s.num_layers)])
        self.final_norm = nn.LayerNorm(d)
        sizes = [d, *cfg.over_arch]
        mlp: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            mlp.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                mlp.append(nn.ReLU())
        self.head = nn.Sequential(*mlp)

    def blocks(self) -> list[HSTULayer]:
        return [cast(HSTULayer, layer) for layer in self.layers]

    def forward(self, hist: torch.Tensor, hist_lengths: torch.Tensor, hist_times: torch.Tensor, context: torch.Tensor,
                cand: torch.Tensor, cand_lengths: torch.Tensor, cand_times: torch.Tensor, max_len: int) -> torch.Tensor:
        """Logits [Tc] of jagged candidate tokens [Tc, D] (cand_lengths per user, each >= 1) after a start token
        and jagged history tokens [Th, D]. The start token is a learned vector plus the projection of the
        user's context features [B, F*D], which candidates also receive; every sequence has one, so a user
        without history still has a state and no exported graph sees zero rows. `max_len` bounds
        1 + history + candidates of one user (a host int: no device sync). The start token takes the first
        event's time (without events, the request's)."""
        b = hist_lengths.shape[0]
        dev = hist.device
        cand_off = _offsets(cand_lengths)
        hist_off = _offsets(hist_lengths)
        start_times = cand_times[cand_off[:-1]]
        if hist_times.numel():
            first = hist_times[hist_off[:-1].clamp(max=hist_times.numel() - 1)]
            start_times = torch.where(hist_lengths > 0, first, start_times)
        lengths = 1 + hist_lengths + cand_lengths
        offsets = _offsets(lengths)
        users = torch.arange(b, device=dev)
        # Row of each start token, history event and candidate in its user's joint sequence.
        s_pos = offsets[:-1]
        h_user = torch.repeat_interleave(users, hist_lengths, output_size=hist.shape[0])
        h_pos = offsets[h_user] + 1 + torch.arange(hist.shape[0], device=dev) - hist_off[h_user]
        c_user = torch.repeat_interleave(users, cand_lengths, output_size=cand.shape[0])
        c_pos = offsets[c_user] + 1 + hist_lengths[c_user] + torch.arange(cand.shape[0], device=dev) - cand_off[c_user]
        total = b + hist.shape[0] + cand.shape[0]
        x = hist.new_empty(total, hist.shape[1])
        ctx = self.context(context)
        # The user's context reaches candidates directly as well as through the start token (the README's
        # HSTU section has the holdout AUC of each).
        cand = cand + self.query + torch.repeat_interleave(ctx, cand_lengths, dim=0, output_size=cand.shape[0])
        x = x.index_copy(0, s_pos, self.bos + ctx).index_copy(0, h_pos, hist).index_copy(0, c_pos, cand)
        times = hist_times.new_empty(total)
        times = times.index_copy(0, s_pos, start_times).index_copy(0, h_pos, hist_times).index_copy(0, c_pos, cand_times)
        for layer in self.blocks():
            x = layer(x, offsets, cand_lengths, times, max_len)
        return self.head(self.final_norm(x[c_pos])).squeeze(-1)


class HSTU(nn.Module):
    """Tables (an EmbeddingCollection, meant for the meta device) + HSTUDense. forward(dense, kjt) scores
    one candidate per row, as the training loop feeds it; `score` scores many candidates for one user."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | str = "meta") -> None:
        super().__init__()
        s = cfg.sequence
        by_name = {f.name: f for f in spec.sparse}
        for role in ("history", "actions", "times", "item", "time"):
            name = getattr(s, role)
            if name not in by_name:
                raise ValueError(f"model.sequence.{role}={name!r} is not a data.sparse feature; features: {list(by_name)}")
        if not (by_name[s.times].raw and by_name[s.time].raw):
            raise ValueError(f"model.sequence.times ({s.times}) and .time ({s.time}) must be raw features (raw: true)")
        if by_name[s.history].table != by_name[s.item].table:
            raise ValueError(f"model.sequence: history ({s.history}) and item ({s.item}) must share one table")
        self.seq = s
        self.embedded = [f.name for f in spec.sparse if not f.raw]
        special = {s.history, s.actions, s.times, s.item, s.time}
        self.context_features = [f.name for f in spec.sparse
                                 if f.side == "user" and not f.raw and not f.multi and f.name not in special]
        self.item_features = [s.item, *(f.name for f in spec.sparse
                                        if f.side == "item" and not f.raw and not f.multi and f.name != s.item)]
        d = cfg.embedding_dim
        self.sparse = EmbeddingCollection(
            tables=[EmbeddingConfig(name=t, embedding_dim=d, num_embeddings=spec.tables[t].rows, feature_names=fs)
                    for t, fs in features_by_table(spec).items()],
            device=torch.device(device),
        )
        self.max_history = spec.history.length
        self.norm = s.attention_norm or float(max(self.max_history, 1))
        self.dense = HSTUDense(len(self.context_features), cfg, self.norm)

    def parallel_plan(self, tp: int) -> DensePlan:
        """Per layer, Q, K, V and U column-wise (each rank holds whole heads) and the output projection
        row-wise (its input stays split by head; one all-reduce joins the output), as Megatron splits
        attention; the relative bias is shared by all heads. FSDP units: the layers."""
        heads, n = self.seq.num_heads, len(self.dense.layers)
        if tp > 1 and heads % tp:
            raise ValueError(f"parallel.tp({tp}) splits model.sequence.num_heads({heads}) across ranks: "
                             f"num_heads % tp = {heads % tp} != 0")
        tensor_parallel: dict[str, Any] = {}
        for i in range(n if tp > 1 else 0):
            tensor_parallel.update({f"layers.{i}.{p}": ColwiseParallel() for p in ("q", "k", "v", "u")})
            tensor_parallel[f"layers.{i}.out"] = RowwiseParallel()
        shared = [f"layers.{i}.{p}" for i in range(n) for p in ("position_bias", "time_bias")] if tp > 1 else []
        return DensePlan(tensor_parallel=tensor_parallel, fsdp_units=[f"layers.{i}" for i in range(n)], head_shared=shared)

    def embed(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        jts = kjt.to_dict()
        looked = self.sparse(KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in self.embedded}))
        return {**jts, **looked}

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        s = self.seq
        jt = self.embed(kjt)
        hist = jt[s.history]
        b = hist.lengths().shape[0]
        items = torch.stack([jt[f].values() for f in self.item_features]).sum(0)
        context = torch.cat([jt[f].values() for f in self.context_features], dim=1) if self.context_features \
            else items.new_zeros(b, self.dense.context.in_features)
        # The data caps histories at max_history: a bound known without reading the lengths back.
        return self.dense(hist.values() + jt[s.actions].values(), hist.lengths(), jt[s.times].values(), context,
                          items, hist.lengths().new_ones(b), jt[s.time].values(), self.max_history + 2)

    def table_of(self, feature: str) -> torch.Tensor:
        """The (unsharded) table a feature looks up: for export and single-user scoring."""
        for c in self.sparse.embedding_configs():
            if feature in c.feature_names:
                return self.sparse.embeddings[c.name].weight
        raise KeyError(feature)

    def score(self, history: torch.Tensor, actions: torch.Tensor, times: torch.Tensor, context: dict[str, int],
              candidates: dict[str, torch.Tensor], request_time: int) -> torch.Tensor:
        """Logits of m candidates for one user, in one joint forward (the reference for the split graphs).
        Arguments are table rows (featurized ids): history/actions/times [n], context feature -> row,
        candidates item feature -> rows [m]."""
        s = self.seq
        m = candidates[s.item].shape[0]
        hist = self.table_of(s.history)[history] + self.table_of(s.actions)[actions]
        items = torch.stack([self.table_of(f)[candidates[f]] for f in self.item_features]).sum(0)
        ctx = torch.cat([self.table_of(f)[context[f]] for f in self.context_features]).unsqueeze(0) \
            if self.context_features else items.new_zeros(1, self.dense.context.in_features)
        return self.dense(hist, torch.tensor([history.shape[0]]), times, ctx, items, torch.tensor([m]),
                          torch.full((m,), request_time, dtype=torch.int64), 1 + history.shape[0] + m)


def single_sequence_attention(layer: HSTULayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              times: torch.Tensor) -> torch.Tensor:
    """One user's history attending causally to itself (no candidates): the user-side graph's attention,
    dense and without the jagged machinery so it exports to ONNX."""
    n = q.shape[0]
    pos = torch.arange(n, device=q.device)
    dist = pos.unsqueeze(1) - pos.unsqueeze(0)
    bias = (layer.position_bias[position_bucket(dist, layer.position_bias.shape[0])]
            + layer.time_bias[time_bucket((times.unsqueeze(1) - times.unsqueeze(0)).abs(), layer.time_bias.shape[0])])
    s = torch.einsum("ihd,jhd->hij", q, k) * layer.alpha + bias
    w = F.silu(s) * (dist >= 0).to(s.dtype)
    return torch.einsum("hij,jhd->ihd", w, v) / layer.norm_by


class UserSide(nn.Module):
    """Graph 1 of the split: one user's history → each layer's keys and values, and the context vector.

    Inputs: history [n, D] (item + action embeddings), times [1 + n] int64 (the start token's, then the
    events'), context [F*D] (the user's single-valued feature embeddings).
    Outputs: user_context [D], keys [L, 1 + n, H, da], values [L, 1 + n, H, dl] (start token first).
    """

    def __init__(self, dense: HSTUDense) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, history: torch.Tensor, times: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.dense.context(context.unsqueeze(0))
        x = torch.cat([self.dense.bos + ctx, history])
        keys, values = [], []
        last = len(self.dense.layers) - 1
        for i, layer in enumerate(self.dense.blocks()):
            u, q, k, v = layer.project(x)
            keys.append(k)
            values.append(v)
            if i < last:  # the last layer's history outputs feed nothing the candidates read
                x = layer.finish(x, single_sequence_attention(layer, q, k, v, times), u)
        return ctx[0], torch.stack(keys), torch.stack(values)


class CandidateSide(nn.Module):
    """Graph 2 of the split: candidates + one user's cached state → logits.

    Inputs: items [m, D] (each candidate's summed item-side embeddings), request_time [1] int64,
    times [1 + n] int64 (as UserSide's), and UserSide's user_context, keys and values.
    """

    def __init__(self, dense: HSTUDense) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, items: torch.Tensor, request_time: torch.Tensor, times: torch.Tensor, user_context: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = items + self.dense.query + user_context
        n = times.shape[0]
        hist_pos = torch.arange(n, device=items.device)
        for i, layer in enumerate(self.dense.blocks()):
            k_hist, v_hist = keys[i], values[i]
            u, q, k, v = layer.project(x)
            # Every candidate sits right after the history (start token included), at the request time; it
            # sees the history and itself.
            bias = (layer.position_bias[position_bucket(n - hist_pos, layer.position_bias.shape[0])]
                    + layer.time_bias[time_bucket((request_time - times).abs(), layer.time_bias.shape[0])])
            s_hist = torch.einsum("mhd,jhd->mhj", q, k_hist) * layer.alpha + bias
            s_self = (q * k).sum(-1) * layer.alpha + layer.position_bias[0] + layer.time_bias[0]
            a = torch.einsum("mhj,jhd->mhd", F.silu(s_hist), v_hist) + F.silu(s_self).unsqueeze(-1) * v
            x = layer.finish(x, a / layer.norm_by, u)
        return self.dense.head(self.dense.final_norm(x)).squeeze(-1)
