"""The naive baseline of bench/serve.py: FastAPI + uvicorn running the eager PyTorch model as trained.

One forward per request over all its candidates; raw values are mapped to rows through the same feature
contract; no cross-request batching, no cache, no export. It gets the CPU budget adsfm gets: as many
uvicorn worker processes as the host has cores (each holds the model), uvloop and httptools, and orjson
for the response.

    python bench/naive_server.py CONFIG.yaml CHECKPOINT PORT [WORKERS]
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
from fastapi.responses import ORJSONResponse  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from adsfm.contract.config import Arch, as_config  # noqa: E402
from adsfm.contract.features import FeatureSpec, Featurizer, is_missing, key_of  # noqa: E402
from adsfm.training.checkpoint import load_into_unsharded  # noqa: E402
from adsfm.training.data import load_features  # noqa: E402
from adsfm.training.models import build_model  # noqa: E402


def create_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory; the paths come from the environment)."""
    import os

    return build(os.environ["ADSFM_NAIVE_CONFIG"], os.environ["ADSFM_NAIVE_CHECKPOINT"])


def build(config: str, checkpoint: str) -> FastAPI:
    cfg = as_config(OmegaConf.load(config))
    fs = load_features(cfg.data)
    model = build_model(fs.spec, cfg.model, device="cpu")
    load_into_unsharded(model, Path(checkpoint))
    model.eval()
    torch.set_num_threads(1)
    app = FastAPI(default_response_class=ORJSONResponse)
    if cfg.model.arch == Arch.hstu:
        _sequence_route(app, model, fs.spec, fs.item_store)
    else:
        _dlrm_route(app, model, fs.spec, fs.item_store)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _items(spec: FeatureSpec, store: dict[str, dict[str, Any]], cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    key = spec.item_column or ""
    out = []
    for c in cands:
        stored = store.get(key_of(c[key], key)) if not is_missing(c.get(key)) else None
        out.append({**(stored or {}), **{k: v for k, v in c.items() if isinstance(v, list) or not is_missing(v)}})
    return out


def _sequence_route(app: FastAPI, model: Any, spec: FeatureSpec, store: dict[str, dict[str, Any]]) -> None:
    """HSTU as trained: the whole model over history + all candidates in one forward per request."""
    s = model.seq
    fz = Featurizer(spec)

    def rows(name: str, raw: Any) -> torch.Tensor:
        return torch.from_numpy(fz.rows(spec.sparse_feature(name), raw, name))

    @app.post("/v1/rank")
    async def rank(request: Request) -> dict[str, Any]:
        body = await request.json()
        user, cands = body.get("user") or {}, body["candidates"]
        items = _items(spec, store, cands)
        times = rows(s.times, user.get(s.times))
        order = torch.argsort(times, stable=True)
        ctx = {f: int(rows(f, user.get(f))[0]) for f in model.context_features}
        cand_rows = {f: torch.cat([rows(f, it.get(f))[:1] for it in items]) for f in model.item_features}
        with torch.no_grad():
            logits = model.score(rows(s.history, user.get(s.history))[order], rows(s.actions, user.get(s.actions))[order],
                                 times[order], ctx, cand_rows, int(rows(s.time, user.get(s.time))[0]))
        scores = torch.sigmoid(logits).tolist()
        ranked = sorted(range(len(items)), key=lambda i: -scores[i])
        return {"candidates": [{"item": cands[i], "score": scores[i], "rank": r + 1} for r, i in enumerate(ranked)]}


def _dlrm_route(app: FastAPI, model: Any, spec: FeatureSpec, store: dict[str, dict[str, Any]]) -> None:
    fz = Featurizer(spec)

    @app.post("/v1/rank")
    async def rank(request: Request) -> dict[str, Any]:
        body = await request.json()
        user, cands = body.get("user") or {}, body["candidates"]
        items = _items(spec, store, cands)
        n = len(items)
        columns = {f.name: [user.get(f.name)] * n if f.side == "user" else [it.get(f.name) for it in items]
                   for f in [*spec.sparse, *spec.dense]}
        lengths, vals = [], []
        for f in spec.sparse:
            v, ln = fz.sparse_column(f, columns[f.name])
            vals.append(v)
            lengths.append(ln)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in spec.sparse],
            values=torch.from_numpy(np.concatenate(vals)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        dense = fz.dense_matrix(columns, n)
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.from_numpy(dense), kjt)).tolist()
        order = sorted(range(n), key=lambda i: -scores[i])
        return {"candidates": [{"item": cands[i], "score": scores[i], "rank": r + 1} for r, i in enumerate(order)]}


if __name__ == "__main__":
    import os

    os.environ["ADSFM_NAIVE_CONFIG"], os.environ["ADSFM_NAIVE_CHECKPOINT"] = sys.argv[1], sys.argv[2]
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else (os.cpu_count() or 1)
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # the workers import bench.naive_server
    uvicorn.run("bench.naive_server:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[3]), workers=workers,
                loop="uvloop", http="httptools", log_level="warning")
