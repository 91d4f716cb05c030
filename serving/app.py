"""Thin Ray Serve wrapper: an HTTP ingress deployment around RankService, loading models:/NAME@ALIAS.

Per request: parse and validate the body against the served bundle's own request schema (the one
/openapi.json publishes) on the event loop; then, batched with concurrent requests (@serve.batch) in one
hop to the scoring thread, featurize (the user side from the replica's cache) and run the dense graph on
all their candidates at once; then the response. Each replica
exposes Prometheus metrics at /metrics.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve import Application

from adsfm.contract.config import ServeConfig, to_plain, typed
from adsfm.contract.features import FeatureError
from adsfm.contract.registry import Split, Traffic, download_version, read_traffic, resolve
from adsfm.contract.request import ErrorResponse, Health, RankResponse
from adsfm.serving import limits, metrics
from adsfm.serving.bundle import open_engine
from adsfm.serving.deltas import DeltaFollower
from adsfm.serving.monitor import Reporter
from adsfm.serving.router import Router, ShadowLog, answer_now
from adsfm.serving.service import RankService, RequestInvalid, Scored, score_one, score_together

logger = logging.getLogger("ray.serve")
# The OpenAPI document and its page are the replica's own (`openapi` below): the request schema is the
# served bundle's, known only once a model is loaded.
api = FastAPI(title="adsfm ranking API", version="1", openapi_url=None, docs_url=None, redoc_url=None)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when serve.auth_token is set)."},
    413: {"model": ErrorResponse, "description": "Body larger than serve.max_request_bytes."},
    422: {"model": ErrorResponse, "description": "A field the request schema or the feature contract refuses, named in loc."},
}


REGISTRY_BACKOFF_MAX_S = 30.0
"""The longest wait between registry reads while the registry is unreachable."""


def poll_delay(interval_s: float, failures: int) -> float:
    """The wait before the next registry read: the interval, doubled per failed read in a row, capped."""
    return min(interval_s * 2 ** min(failures, 30), max(REGISTRY_BACKOFF_MAX_S, interval_s))

RUNTIME_KNOBS = frozenset({"batch_max_requests", "batch_wait_ms", "deadline_ms", "spillover_queue", "shadow_rate", "compare_rate",
                           "shadow_max_in_flight", "user_cache_size", "user_cache_bytes", "cache_generation"})
"""ServeConfig fields a live replica takes through reconfigure (Ray Serve's user_config), and cache_generation."""


def bind_internal_servers_to_node_address() -> None:
    """The replica's inter-deployment gRPC server listens on the node's own address, not on every
    interface: Ray 2.60 binds it to [::]:0 with no setting to change it, so the replica (this process)
    rewrites the address its helper is given. On a local cluster the node's address is 127.0.0.1."""
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "adsfm_node_address", False):
        return
    host = ray.util.get_node_ip_address()

    def on_node_address(server: Any, address: str) -> int:
        return original(server, address.replace("[::]", host, 1) if address.startswith("[::]:") else address)  # type: ignore[no-any-return]

    on_node_address.adsfm_node_address = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_node_address


def _loc(field: str) -> list[str | int]:
    """'candidates[3].item_id' → ['body', 'candidates', 3, 'item_id'] (FastAPI's way of naming a field)."""
    out: list[str | int] = ["body"]
    for part in field.split("."):
        m = re.fullmatch(r"(.*)\[(\d+)\]", part)
        out += [m.group(1), int(m.group(2))] if m else [part]
    return out


def _refused(details: list[dict[str, Any]]) -> JSONResponse:
    metrics.REQUESTS.labels("422").inc()
    return JSONResponse(status_code=422, content={"detail": details})


@api.exception_handler(FeatureError)
async def _feature_error(_request: Request, exc: FeatureError) -> JSONResponse:
    return _refused([{"loc": _loc(exc.field), "msg": str(exc), "type": "value_error"}])


@api.exception_handler(RequestInvalid)
async def _request_invalid(_request: Request, exc: RequestInvalid) -> JSONResponse:
    return _refused([{**e, "loc": ["body", *e["loc"]]} for e in exc.errors])


api.add_middleware(limits.LimitsMiddleware)


@serve.deployment
@serve.ingress(api)
class RankingDeployment:
    def __init__(self, cfg: ServeConfig, tracking_uri: str) -> None:
        bind_internal_servers_to_node_address()
        self.cfg, self.tracking_uri = cfg, tracking_uri
        self.cache = Path(tempfile.mkdtemp(prefix="adsfm-serve-"))
        # Work off the event loop, one thread each: the batched requests (featurizing, a user graph on a
        # cache miss, the graphs: one hop per request), fallbacks, which must not queue behind the batch
        # that made a request late, and shadow copies. The loop only routes, so a request past its deadline
        # is answered while the others still run.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="adsfm-score")
        self.fallback_pool = ThreadPoolExecutor(1, thread_name_prefix="adsfm-fallback")
        self.shadow_pool = ThreadPoolExecutor(1, thread_name_prefix="adsfm-shadow")
        spill = self._load_spillover(cfg.spillover) if cfg.spillover else None
        shadow = ShadowLog(cfg.shadow_log, cfg.shadow_rate, cfg.shadow_max_in_flight)
        self.router = Router(self._load(cfg.model_name), self._score, answer=self._answer,
                             shadow_score=self._shadow_score, spillover=spill, sticky_field=cfg.sticky_field, deadline_ms=cfg.deadline_ms,
                             report=(reporter := Reporter(cfg.model_name)), shadow=shadow, report_quality=reporter.quality,
                             compare_rate=cfg.compare_rate)
        self.in_flight = 0
        self._deltas: DeltaFollower | None = None
        metrics.REPLICA.info({"replica": serve.get_replica_context().replica_id.unique_id})
        metrics.QUEUE.set_function(lambda: self.in_flight)  # read at scrape time, not set per request
        metrics.DELTA_SEQ.set_function(lambda: self.service.engine.applied_seq)
        metrics.FRESHNESS_LAG.set_function(self._freshness_lag)
        metrics.DELTA_ERRORS.set_function(lambda: self._deltas.errors if self._deltas else 0)
        self._cache_generation: Any = None
        self._lease_lapsed = False
        self._openapi: tuple[RankService, dict[str, Any]] | None = None
        self._score_batch.set_max_batch_size(cfg.batch_max_requests)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)  # type: ignore[attr-defined]
        limits.SETTINGS["limits"] = limits.Limits.of(cfg)  # for the middleware; one replica per process

        self._attach_deltas()
        if cfg.reload_interval_s > 0:
            threading.Thread(target=self._follow_registry, daemon=True, name="adsfm-registry-watch").start()

    def _freshness_lag(self) -> float:
        lag = self._deltas.lag_s() if self._deltas is not None else None
        return float("nan") if lag is None else lag

    def _attach_deltas(self) -> None:
        """Follow the delta log the champion version is tagged with, once the tag exists (adsfm-continuous
        writes it when it starts); a new champion version stops the old follower and starts its own."""
        if self.cfg.delta_poll_s <= 0:
            return
        service = self.service
        if self._deltas is not None and self._deltas.engine is service.engine:
            return
        from mlflow.tracking import MlflowClient

        path = MlflowClient(self.tracking_uri).get_model_version(service.model_name, service.model_version).tags.get("adsfm.delta_log")
        if self._deltas is not None:
            self._deltas.stop()
            self._deltas = None
        if path:
            self._deltas = DeltaFollower(service.engine, path, self.cfg.delta_compact_fraction).start(self.cfg.delta_poll_s)
            logger.info("adsfm: version %s follows the delta log %s", service.model_version, path)

    def reconfigure(self, knobs: dict[str, Any]) -> None:
        """Runtime knobs (Ray Serve's user_config), applied to live replicas without a restart: batching, the
        deadline, spillover and shadow settings, and the user-state caches (a new `cache_generation` empties
        them)."""
        unknown = sorted(set(knobs) - RUNTIME_KNOBS)
        if unknown:
            raise ValueError(f"serve knobs {unknown} cannot change at runtime; these can: {sorted(RUNTIME_KNOBS)}")
        generation = knobs.get("cache_generation")
        self.cfg = typed(ServeConfig, {**to_plain(self.cfg), **{k: v for k, v in knobs.items() if k != "cache_generation"}})
        limits.SETTINGS["limits"] = limits.Limits.of(self.cfg)
        c, r = self.cfg, self.router
        self._score_batch.set_max_batch_size(c.batch_max_requests)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(c.batch_wait_ms / 1000)  # type: ignore[attr-defined]
        r.deadline_ms = c.deadline_ms
        r.shadow.rate, r.shadow.max_in_flight, r.compare_rate = c.shadow_rate, c.shadow_max_in_flight, c.compare_rate
        for service in (r.champion, r.challenger, r.spillover):
            if service is not None:
                service.engine.user_cache.resize(c.user_cache_size, c.user_cache_bytes)
                if generation is not None and generation != self._cache_generation:
                    service.engine.user_cache.clear()
        self._cache_generation = generation if generation is not None else self._cache_generation

    @property
    def service(self) -> RankService:
        return self.router.champion

    def _load(self, name: str, alias: str | None = None, version: str | None = None) -> RankService:
        """models:/name@alias, or models:/name/version, downloaded and opened beside what is served."""
        if version is None:
            version, bundle = resolve(name, alias or self.cfg.alias, self.tracking_uri, self.cache)
        else:
            bundle = download_version(name, version, self.tracking_uri, self.cache)
        engine = open_engine(bundle, self.cfg.intra_op_threads, self.cfg.user_cache_size, self.cfg.user_cache_bytes,
                             self.cfg.item_cache_bytes)
        return RankService(engine, name, version, self.cfg.max_candidates, self.cfg.max_values, self.cfg.rank_by)

    def _load_spillover(self, ref: str) -> RankService:
        """The lighter model named `NAME@ALIAS`, loaded once beside the main one."""
        name, sep, alias = ref.partition("@")
        if not (name and sep and alias):
            raise ValueError(f"serve.spillover={ref!r}: use NAME@ALIAS, e.g. adsfm-movielens-dlrm-small@champion")
        return self._load(name, alias)

    def _follow_registry(self) -> None:
        """Poll the aliases and the split. A moved-to version is loaded beside the serving one, then the
        reference is swapped: requests in flight finish on the old object, so a move fails none of them."""
        from mlflow.tracking import MlflowClient

        # MLflow's HTTP client retries a refused connection 7 times, backing off for minutes; this poll backs
        # off on its own (poll_delay) and must see the registry come back within one of its waits.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        client = MlflowClient(self.tracking_uri)
        failures = 0
        while True:
            # While the registry is unreachable the poll backs off (doubling, up to REGISTRY_BACKOFF_MAX_S)
            # and the replica serves what it has loaded; the first read that succeeds applies what moved.
            time.sleep(poll_delay(self.cfg.reload_interval_s, failures))
            try:
                traffic = read_traffic(client, self.cfg.model_name, self.cfg.alias)
            except Exception as e:  # a registry outage must not kill the replica; keep serving what we have
                failures += 1
                metrics.REGISTRY_ERRORS.inc()
                metrics.REGISTRY_UP.set(0)
                logger.warning("adsfm: registry %s unreachable (%d in a row: %s); still serving version %s, next try in %.1fs",
                               self.tracking_uri, failures, type(e).__name__, self.service.model_version,
                               poll_delay(self.cfg.reload_interval_s, failures))
                continue
            if failures:
                logger.warning("adsfm: registry reachable again after %d failed reads", failures)
            failures = 0
            metrics.REGISTRY_UP.set(1)
            try:
                self._apply(traffic)
                self._attach_deltas()
            except Exception:  # a version that fails to load must not kill the replica either
                logger.exception("adsfm: applying the registry's aliases failed; still serving version %s", self.service.model_version)

    def _apply(self, t: Traffic) -> None:
        r = self.router
        if t.champion is not None and t.champion != r.champion.model_version:
            # the challenger promoted by adsfm-shift is already loaded here: reuse it
            r.champion = r.challenger if r.challenger and r.challenger.model_version == t.champion else self._load(self.cfg.model_name, version=t.champion)
            logger.info("adsfm: %s@%s moved to version %s; now serving it", self.cfg.model_name, self.cfg.alias, t.champion)
        wanted = t.challenger if (t.split.challenger_pct > 0 or t.split.shadow) and t.challenger != t.champion else None
        if wanted is None:
            r.challenger, r.challenger_error = None, None
        elif (r.challenger is None or r.challenger.model_version != wanted) and r.challenger_error != wanted:
            try:
                r.challenger, r.challenger_error = self._load(self.cfg.model_name, version=wanted), None
                logger.info("adsfm: challenger version %s loaded", wanted)
            except Exception:  # a broken challenger must not take the champion down: its share falls back
                logger.exception("adsfm: challenger version %s failed to load; its share goes to the champion", wanted)
                r.challenger, r.challenger_error = None, wanted
        r.split = t.split if wanted else Split()  # challenger == champion (just promoted): nothing to split
        if (t.lapsed is not None) != self._lease_lapsed:
            self._lease_lapsed = t.lapsed is not None
            if t.lapsed is not None:
                logger.warning("adsfm: the split %s%% to challenger %s outlived its controller's lease (until %s); "
                               "all traffic on the champion", t.lapsed.challenger_pct, t.challenger, t.lapsed.lease_until)
            metrics.LEASE_LAPSED.set(int(self._lease_lapsed))
        metrics.SPLIT_PCT.set(r.split.challenger_pct)

    async def _answer(self, service: RankService, req: Any, arrived: float) -> RankResponse:
        return await asyncio.get_running_loop().run_in_executor(self.fallback_pool, answer_now, service, req, arrived)

    async def _shadow_score(self, service: RankService, req: Any, arrived: float) -> Scored:
        return await asyncio.get_running_loop().run_in_executor(self.shadow_pool, score_one, service, req, arrived)

    async def _score(self, service: RankService, req: Any, arrived: float) -> Scored:
        item = (service, req, arrived)
        if self.in_flight <= 1:  # alone on the replica: no company to wait batch_wait_ms for
            out = (await self._run([item]))[0]
        else:
            out = await self._score_batch(item)
        if isinstance(out, Exception):
            raise out
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def _score_batch(self, items: list[tuple[RankService, Any, float]]) -> list[Scored | Exception]:
        """Concurrent requests prepared and scored together, in one hop to the scoring thread (one
        dense-graph run for DLRM)."""
        return await self._run(items)

    async def _run(self, items: list[tuple[RankService, Any, float]]) -> list[Scored | Exception]:
        metrics.BATCH.observe(len(items))
        return await asyncio.get_running_loop().run_in_executor(self.pool, score_together, items)

    @api.post("/v1/rank", response_model=RankResponse, responses=ERRORS)
    async def rank(self, request: Request) -> Response:
        """Rank the candidates for one user, best first. The body's schema is the served model's: its
        features by name, each optional, and the item id on every candidate (see /openapi.json)."""
        arrived = time.perf_counter()  # deadlines and reported latency count from here
        req = self.service.parse(await request.body())
        spill = None
        if self.router.spillover is not None and self.in_flight >= self.cfg.spillover_queue:
            spill = self.router.spillover
            metrics.SPILLOVER.inc()
        self.in_flight += 1
        try:
            res = await self.router.rank(req, main=spill, arrived=arrived)
        finally:
            self.in_flight -= 1
        metrics.LATENCY.labels(res.model_version).observe(res.latency_ms / 1e3)
        metrics.CANDIDATES.observe(len(req.candidates))
        metrics.REQUESTS.labels("200").inc()
        # Serialized here, once: FastAPI would validate the response model again on its way out.
        return Response(content=RankService.encode(res), media_type="application/json")

    @api.get("/healthz")
    def healthz(self) -> Health:
        return self.service.health()

    @api.get("/readyz")
    def readyz(self) -> Health:
        """Ready once a model version is loaded (the replica constructor loads one or fails)."""
        return self.service.health()

    @api.get("/v1/traffic")
    def traffic(self) -> dict[str, Any]:
        """What this replica serves: champion, challenger (or why it is not loaded) and the split."""
        r = self.router
        return {"champion": r.champion.model_version, "challenger": r.challenger and r.challenger.model_version,
                "challenger_error": r.challenger_error, "split": asdict(r.split)}

    @api.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format."}})
    def metrics(self) -> PlainTextResponse:
        info = self.service.engine.user_cache_info()
        metrics.CACHE.labels("hits").set(info.hits)
        metrics.CACHE.labels("misses").set(info.misses)
        metrics.CACHE.labels("size").set(info.currsize)
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> JSONResponse:
        """The API's OpenAPI document, with /v1/rank's request schema derived from the served bundle."""
        service = self.service
        if self._openapi is None or self._openapi[0] is not service:
            doc = get_openapi(title=api.title, version=api.version, routes=api.routes)
            schema = service.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components["RankRequest"] = schema
            doc["paths"]["/v1/rank"]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RankRequest"}}}}
            if self.cfg.auth_token:  # the routes the token guards say so, with their 401
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in doc["paths"].items():
                    if path.startswith("/v1/") or (path == "/metrics" and self.cfg.protect_metrics):
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
                            op["responses"].setdefault("401", {"description": ERRORS[401]["description"], "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            self._openapi = (service, doc)
        return JSONResponse(self._openapi[1])

    @api.get("/docs", include_in_schema=False)
    def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} ({self.service.model_name})")


def build_app(cfg: ServeConfig, tracking_uri: str, knobs: dict[str, Any] | None = None) -> Application:
    """The typed app builder: one ranker deployment behind Ray Serve's HTTP proxy. min_replicas are
    provisioned capacity; with max_replicas above it, Ray Serve adds replicas on demand when the ongoing
    requests per replica pass target_ongoing_requests. `knobs` (RUNTIME_KNOBS) reach live replicas through
    Ray Serve's user_config: deploying the same app with other knobs reconfigures them without a restart;
    a knob that cannot change at runtime is refused here, before any replica sees it."""
    unknown = sorted(set(knobs or {}) - RUNTIME_KNOBS)
    if unknown:
        raise ValueError(f"serve knobs {unknown} cannot change at runtime; these can: {sorted(RUNTIME_KNOBS)}")
    scaling: dict[str, Any] = {"num_replicas": cfg.num_replicas}
    if cfg.max_replicas > max(cfg.min_replicas, 1):
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": cfg.target_ongoing_requests}}
    # A version fixed by what the replicas are built from: deploying again with other knobs is then Ray Serve's
    # lightweight update (reconfigure on the live replicas), where a Python deploy would get a random version,
    # i.e. new replicas. What `serve deploy` does for a config file (its code version), done for `start`.
    built_from = json.dumps([to_plain(cfg), tracking_uri], sort_keys=True)
    version = hashlib.sha256(built_from.encode()).hexdigest()[:16]
    return RankingDeployment.options(  # type: ignore[attr-defined]
        _internal=True, version=version,
        max_ongoing_requests=cfg.max_ongoing_requests,
        user_config=dict(knobs or {}),
        # A log line per request, shipped to the driver, costs a small host more than scoring the request.
        logging_config={"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"},
        **scaling,
    ).bind(cfg, tracking_uri)


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run launch/serve.yaml`: the app from a Serve config file's `args` (ServeConfig fields and
    `tracking_uri`); unknown keys fail here, with their names."""
    args = dict(args)
    tracking_uri = args.pop("tracking_uri", None)
    if not tracking_uri:
        raise ValueError("serve config args.tracking_uri is required (e.g. sqlite:////abs/path/runs/mlflow.db)")
    known = set(ServeConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve config args: unknown keys {unknown}; known: {sorted(known)}")
    # The same token as the Hydra path (conf/serve: auth_token from ADSFM_SERVE_TOKEN), unless args set one.
    args.setdefault("auth_token", os.environ.get("ADSFM_SERVE_TOKEN") or None)
    return build_app(typed(ServeConfig, args), tracking_uri)


def start(cfg: ServeConfig, tracking_uri: str, name: str = "adsfm", route_prefix: str = "/",
          knobs: dict[str, Any] | None = None) -> str:
    """Run the app on an initialised Ray; returns the base URL (with the route prefix). When it already runs
    with the same `cfg`, other `knobs` reconfigure its live replicas without a restart (see build_app)."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, tracking_uri, knobs), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{route_prefix.rstrip('/')}"


def stop(name: str = "adsfm") -> None:
    serve.delete(name)


__all__: list[Any] = ["build_app", "start", "stop", "RankingDeployment"]
