"""Thin Ray Serve wrapper: an HTTP ingress deployment around RankService, loading models:/NAME@ALIAS."""

# No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.

import logging
import tempfile
import threading
import time
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

logger = logging.getLogger("ray.serve")
api = FastAPI(title="adsfm ranking API", version="1")


@api.exception_handler(FeatureError)
async def _feature_error(_request: Request, exc: FeatureError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{"loc": exc.field.split("."), "msg": str(exc)}]})


@serve.deployment
@serve.ingress(api)
class RankerDeployment:
    def __init__(self, cfg: ServeConfig, tracking_uri: str) -> None:
        self.cfg, self.tracking_uri = cfg, tracking_uri
        self.cache = Path(tempfile.mkdtemp(prefix="adsfm-serve-"))
        self.service = self._load()
        if cfg.reload_interval_s > 0:
            threading.Thread(target=self._follow_alias, daemon=True, name="adsfm-alias-watch").start()

    def _load(self, version: str | None = None) -> RankService:
        from export.registry import download_version, resolve

        if version is None:
            version, bundle = resolve(self.cfg.model_name, self.cfg.alias, self.tracking_uri, self.cache)
        else:
            bundle = download_version(self.cfg.model_name, version, self.tracking_uri, self.cache)
        ranker = Ranker(bundle, self.cfg.intra_op_threads)
        return RankService(ranker, self.cfg.model_name, version, self.cfg.max_candidates)

    def _follow_alias(self) -> None:
        """Poll the alias; load a moved-to version beside the serving one, then swap the reference.
        Requests in flight finish on the old service object, so a move fails none of them."""
        from mlflow.tracking import MlflowClient

        from export.registry import alias_version

        client = MlflowClient(self.tracking_uri)
        while True:
            time.sleep(self.cfg.reload_interval_s)
            try:
                version = alias_version(client, self.cfg.model_name, self.cfg.alias)
                if version is not None and version != self.service.model_version:
                    self.service = self._load(version)
                    logger.info("adsfm: %s@%s moved to version %s; now serving it", self.cfg.model_name, self.cfg.alias, version)
            except Exception:  # a registry hiccup must not kill the replica; keep serving what we have
                logger.exception("adsfm: alias check failed; still serving version %s", self.service.model_version)

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
    ).bind(cfg, tracking_uri)


def start(cfg: ServeConfig, tracking_uri: str, name: str = "adsfm") -> str:
    """Run the app on an initialised Ray; returns the base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, tracking_uri), name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def stop(name: str = "adsfm") -> None:
    serve.delete(name)


__all__: list[Any] = ["build_app", "start", "stop", "RankerDeployment"]
