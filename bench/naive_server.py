"""The naive baseline of bench/serve.py: FastAPI + uvicorn running the eager PyTorch model as trained.

One request at a time, one forward per request over all its candidates; raw values are mapped to rows with
the training vocabularies; no cross-request batching, no cache, no export.

    python bench/naive_server.py CONFIG.yaml CHECKPOINT PORT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]  # bench/export.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from training.checkpoint import load_into_unsharded  # noqa: E402
from training.data import Vocab, load_features  # noqa: E402
from training.job import as_config  # noqa: E402
from training.models import build_model  # noqa: E402


def values(f: dict[str, Any], raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, list):
        return [str(v) for v in raw]
    return [t for t in str(raw).split(f["sep"]) if t] if f["multi"] else [str(raw)]


def build(config: str, checkpoint: str) -> FastAPI:
    cfg = as_config(OmegaConf.load(config))
    fs = load_features(cfg.data)
    spec = fs.spec
    model = build_model(spec, cfg.model, device="cpu")
    load_into_unsharded(model, Path(checkpoint))
    model.eval()
    torch.set_num_threads(1)
    vocabs = {t: Vocab(hash_buckets=v["hash_buckets"], tokens=v["vocab"]) for t, v in spec["tables"].items()}
    store: dict[str, dict[str, Any]] = spec["item_store"]
    key = spec["item_column"]
    app = FastAPI()
    if cfg.model.name == "hstu":
        _sequence_route(app, model, spec, vocabs)
    else:
        _dlrm_route(app, model, spec, vocabs, store, key)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _sequence_route(app: FastAPI, model: Any, spec: dict[str, Any], vocabs: dict[str, Vocab]) -> None:
    """HSTU as trained: the whole model over history + all candidates in one forward per request."""
    s = model.seq
    by_name = {f["name"]: f for f in spec["sparse"]}
    store: dict[str, dict[str, Any]] = spec["item_store"]
    key = spec["item_column"]

    def rows(name: str, raw: Any) -> torch.Tensor:
        f = by_name[name]
        vals = values(f, raw)
        if f.get("raw"):
            return torch.tensor([int(float(v)) for v in vals], dtype=torch.int64)
        return torch.from_numpy(vocabs[f["table"]].lookup(vals))

    @app.post("/v1/rank")
    async def rank(request: Request) -> dict[str, Any]:
        body = await request.json()
        user, cands = body["user"], body["candidates"]
        items = [{**store.get(str(c.get(key)), {}), **c} for c in cands]
        times = rows(s.times, user.get(s.times))
        order = torch.argsort(times, stable=True)
        ctx = {f: int(rows(f, user.get(f))[0]) if user.get(f) is not None else 0 for f in model.context_features}
        cand_rows = {f: torch.cat([rows(f, it.get(f))[:1] if it.get(f) is not None else torch.zeros(1, dtype=torch.int64)
                                   for it in items]) for f in model.item_features}
        with torch.no_grad():
            logits = model.score(rows(s.history, user.get(s.history))[order], rows(s.actions, user.get(s.actions))[order],
                                 times[order], ctx, cand_rows, int(rows(s.time, user.get(s.time))[0]))
        scores = torch.sigmoid(logits).tolist()
        ranked = sorted(range(len(items)), key=lambda i: -scores[i])
        return {"candidates": [{"item": cands[i], "score": scores[i], "rank": r + 1} for r, i in enumerate(ranked)]}


def _dlrm_route(app: FastAPI, model: Any, spec: dict[str, Any], vocabs: dict[str, Vocab], store: dict[str, dict[str, Any]],
                key: str) -> None:

    @app.post("/v1/rank")
    async def rank(request: Request) -> dict[str, Any]:
        body = await request.json()
        user, cands = body["user"], body["candidates"]
        items = [{**store.get(str(c.get(key)), {}), **c} for c in cands]
        n = len(items)
        lengths, vals = [], []
        for f in spec["sparse"]:
            per = [values(f, user.get(f["name"]))] * n if f["side"] == "user" else [values(f, it.get(f["name"])) for it in items]
            lengths.append([len(p) for p in per])
            vals.append(vocabs[f["table"]].lookup([v for p in per for v in p]))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f["name"] for f in spec["sparse"]],
            values=torch.from_numpy(np.concatenate(vals)),
            lengths=torch.tensor(np.concatenate(lengths), dtype=torch.int32),
        )
        dense = np.zeros((n, len(spec["dense"])), dtype=np.float32)
        for k, d in enumerate(spec["dense"]):
            raw = [user.get(d["name"])] * n if d["side"] == "user" else [it.get(d["name"]) for it in items]
            x = np.array([np.nan if v is None else float(v) for v in raw])
            x = np.log1p(np.maximum(x, 0)) if d["log1p"] else x
            dense[:, k] = np.nan_to_num((x - d["mean"]) / d["std"])
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.from_numpy(dense), kjt)).tolist()
        order = sorted(range(n), key=lambda i: -scores[i])
        return {"candidates": [{"item": cands[i], "score": scores[i], "rank": r + 1} for r, i in enumerate(order)]}


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1], sys.argv[2]), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
