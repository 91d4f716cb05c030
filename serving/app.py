"""Thin Ray Serve wrapper: an HTTP ingress deployment around RankService, loading models:/NAME@ALIAS."""

# No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.

import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from serving.config import ServeConfig
from serving.ranker import FeatureError, Ranker
from serving.schemas import Health, RankRequest, RankResponse
from serving.service import RankService

api = FastAPI(title="adsfm ranking API", version="1")


@api.exception_handler(FeatureError)
async def _feature_error(_request: Request, exc: FeatureError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{"loc": exc.field.split("."), "msg": str(exc)}]})


@serve.deployment
@serve.ingress(api)
class RankerDeployment:
    def __init__(self, model_name: str, alias: str, tracking_uri: str, max_candidates: int, intra_op_threads: int) -> None:
        from export.registry import resolve

        cache = Path(tempfile.mkdtemp(prefix="adsfm-serve-"))
        version, bundle = resolve(model_name, alias, tracking_uri, cache)
        self.service = RankService(Ranker(bundle, intra_op_threads), model_name, version, max_candidates)

    @api.post("/v1/rank")
    def rank(self, req: RankRequest) -> RankResponse:
        return self.service.rank(req)

    @api.get("/healthz")
    def healthz(self) -> Health:
        return self.service.health()


def build_app(cfg: ServeConfig, tracking_uri: str) -> Application:
    """The typed app builder: one ranker deployment behind Ray Serve's HTTP proxy."""
    return RankerDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.num_replicas, max_ongoing_requests=cfg.max_ongoing_requests
    ).bind(cfg.model_name, cfg.alias, tracking_uri, cfg.max_candidates, cfg.intra_op_threads)


def start(cfg: ServeConfig, tracking_uri: str, name: str = "adsfm") -> str:
    """Run the app on an initialised Ray; returns the base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, tracking_uri), name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def stop(name: str = "adsfm") -> None:
    serve.delete(name)


__all__: list[Any] = ["build_app", "start", "stop", "RankerDeployment"]
