"""App wiring: config -> models -> roles (model + batcher) -> index -> engine -> gRPC server with health, reflection,
metrics, structured logs and graceful shutdown.

Start-up order: the gRPC port opens first with health NOT_SERVING (RPCs answer UNAVAILABLE), then models
and index load off the event loop, then health turns SERVING. On SIGTERM/SIGINT: health NOT_SERVING, new
RPCs are refused with UNAVAILABLE, in-flight ones get `grace_period_s` to finish, the index is saved.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twostage.model.model_set import open_model_set
from twostage.model.onnx_model import OnnxModel
from twostage.server.auth import ApiKeyInterceptor, ConcurrencyLimitInterceptor, DecodeGuardInterceptor
from twostage.server.config import Config
from twostage.server.engine import Engine
from twostage.server.errors import Unavailable
from twostage.server.index.backend import Snapshotting
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.milvus import MilvusIndex, MilvusSettings, ModelFingerprint
from twostage.server.index.settings import IndexSettings
from twostage.server.metrics import Metrics
from twostage.server.roles import BatchLimits, EmbeddingRole, RerankRole, inference_pool, session_settings
from twostage.server.service import FUSION, RETRIEVAL_MODE, TwoStageService
from twostage.v1 import twostage_pb2 as pb, twostage_pb2_grpc as pb_grpc

log = logging.getLogger("twostage.app")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TwoStage"].full_name
BACKEND_CHECK_INTERVAL_S = 1.0  # how often the health watcher probes a remote (Milvus) backend
BACKEND_RETRY_MAX_S = 5.0  # longest wait between attempts to reach it at startup


def server_version() -> str:
    try:
        return metadata.version("twostage")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("twostage")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


def build_info(config: Config, engine: Engine) -> pb.InfoResponse:
    def model_info(role: str, model: OnnxModel) -> pb.ModelInfo:
        m = model.manifest
        src = m.get("source", {})
        source = f"{src.get('kind', '?')}:{src.get('id') or src.get('path') or ''}"
        quant = m.get("quantization", {}) or {}
        qdesc = "none" if quant.get("mode", "none") == "none" else "-".join(
            str(p) for p in (quant.get("mode"), quant.get("target")) if p)
        return pb.ModelInfo(role=role, name=str(m.get("name", "")), source=source,
                            revision=str(src.get("revision", "")), max_length=int(model.max_length),
                            dimension=int(model.dimension), pooling=str(m.get("pooling") or ""),
                            normalize=bool(m.get("normalize", False)), quantization=qdesc,
                            sha256=str(m["files"].get(m["model_file"], "")), providers=list(model.providers))

    def batching(prefix: str) -> pb.BatchingInfo:
        return pb.BatchingInfo(enabled=config.batching, max_batch_tokens=getattr(config, f"{prefix}_max_batch_tokens"),
                               max_batch_size=getattr(config, f"{prefix}_max_batch_size"),
                               max_delay_ms=getattr(config, f"{prefix}_max_delay_ms"),
                               max_queued_tokens=getattr(config, f"{prefix}_max_queued_tokens"))

    index = engine.index.describe()  # backend settings; absent keys read as 0 / ""
    return pb.InfoResponse(
        server_version=server_version(),
        bi_encoder=model_info("bi-encoder", engine.embedder.model),
        cross_encoder=model_info("cross-encoder", engine.reranker.model),
        embed_batching=batching("embed"), rerank_batching=batching("rerank"),
        index=pb.IndexInfo(size=engine.index.size, dimension=engine.index.dimension, metric=index.get("metric", ""),
                           dtype=index.get("dtype", ""), connectivity=int(index.get("connectivity", 0)),
                           expansion_add=int(index.get("expansion_add", 0)),
                           expansion_search=int(index.get("expansion_search", 0)), read_only=engine.index.read_only,
                           backend=engine.index.kind, collection=index.get("collection", "")),
        limits=pb.Limits(max_query_bytes=config.max_query_bytes, max_metadata_bytes=config.max_metadata_bytes,
                         max_filter_keys=config.max_filter_keys, max_text_bytes=config.max_text_bytes,
                         max_id_bytes=config.max_id_bytes, max_rerank_documents=config.max_rerank_documents,
                         max_embed_texts=config.max_embed_texts, max_upsert_documents=config.max_upsert_documents,
                         max_top_k=config.max_top_k, max_candidates=config.max_candidates,
                         max_message_bytes=config.max_message_bytes, max_concurrent_rpcs=config.max_concurrent_rpcs),
        defaults=pb.Defaults(top_k=config.default_top_k, candidates=config.default_candidates,
                             chunk_overlap_tokens=config.default_chunk_overlap_tokens,
                             retrieval_mode=RETRIEVAL_MODE[config.retrieval_mode], fusion=FUSION[config.fusion],
                             fusion_weight=config.fusion_weight, rerank_weight=config.rerank_weight,
                             latency_budget_ms=config.default_latency_budget_ms),
    )


def load_engine(config: Config, metrics: Metrics | None) -> Engine:
    """Blocking: verify and load both models, open the index, make the roles (not yet started: `engine.start()`
    on the serving loop; `await engine.close()` stops everything made here). A Milvus backend is only made here;
    start_server's loader connects it, waiting for Milvus."""
    embedder, reranker = open_model_set(Path(config.models), session_settings(config))
    index: DocumentIndex | MilvusIndex
    if config.milvus_uri:
        index = MilvusIndex(MilvusSettings.from_config(config), ModelFingerprint.of(embedder))
    else:
        index = DocumentIndex.open(Path(config.index), embedder.dimension, IndexSettings.from_config(config))
    # One pool of workers for both models, sized with the sessions' intra-op threads to the cores.
    pool = inference_pool(config)
    return Engine(config, EmbeddingRole(embedder, pool, BatchLimits.from_config(config, "embed"), metrics),
                  RerankRole(reranker, pool, BatchLimits.from_config(config, "rerank"), metrics), index, pool)


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class RunningServer:
    """A started server. `stop()` drains and closes it."""

    config: Config
    server: grpc.aio.Server
    port: int
    metrics_port: int
    health: health.aio.HealthServicer
    service: TwoStageService
    metrics: Metrics
    _loading: asyncio.Task | None = None
    _saver: asyncio.Task | None = None
    _watcher: asyncio.Task | None = None
    _stopped: bool = False

    @property
    def target(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "[::]", "::") else "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def engine(self) -> Engine | None:
        return self.service.engine

    async def wait_loaded(self) -> Engine:
        """Wait for models and index; re-raises a loading failure."""
        assert self._loading is not None
        await self._loading
        assert self.service.engine is not None
        return self.service.engine

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace})
        self.service.draining = True  # new RPCs: UNAVAILABLE at once
        await self.health.enter_graceful_shutdown()
        end = time.monotonic() + grace
        while self.service.active > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for task in (self._saver, self._watcher):
            if task is not None:
                task.cancel()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.server.stop(max(0.0, end - time.monotonic()))
        engine = self.service.engine
        if engine is not None:
            await engine.close(drain_timeout=1.0)
        self.metrics.close()
        log.info("stopped")


async def start_server(config: Config) -> RunningServer:
    """Open the port (health NOT_SERVING), then load models and index in the background."""
    metrics = Metrics()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = []
    api_keys = ApiKeyInterceptor.from_config(config, observe_rpc=metrics.observe_rpc)
    if api_keys is not None:
        interceptors.append(api_keys)  # first: refused RPCs are never decoded
    # before decoding; health watches and reflection are not counted
    interceptors.append(ConcurrencyLimitInterceptor(config.max_concurrent_rpcs, SERVICE_NAME, metrics.observe_rpc))
    interceptors.append(DecodeGuardInterceptor())
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    service = TwoStageService(info=lambda engine: build_info(config, engine), metrics=metrics)
    pb_grpc.add_TwoStageServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.port}"
    creds = _credentials(config)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    metrics_port = metrics.serve(config.metrics_port, config.host if config.host not in ("[::]", "::") else "0.0.0.0") \
        if config.metrics_port >= 0 else -1
    log.info("listening", extra={"address": f"{config.host}:{port}", "metrics_port": metrics_port,
                                 "tls": creds is not None, "api_keys": api_keys is not None,
                                 "config": config.as_dict()})

    rs = RunningServer(config=config, server=server, port=port, metrics_port=metrics_port, health=health_servicer,
                       service=service, metrics=metrics)

    async def load() -> None:
        t0 = time.perf_counter()
        engine = await asyncio.to_thread(load_engine, config, metrics)
        if isinstance(engine.index, MilvusIndex):
            try:
                await _connect_backend(engine.index)
            except BaseException:
                await asyncio.to_thread(engine.index.close)
                engine.pool.shutdown()
                raise
        engine.start()
        await engine.warm_up()
        service.engine = engine
        metrics.index_size.set(engine.index.size)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"load_s": round(time.perf_counter() - t0, 2), "index_size": engine.index.size,
                                   "bi_encoder": engine.embedder.model.name,
                                   "cross_encoder": engine.reranker.model.name})
        if isinstance(engine.index, MilvusIndex):
            rs._watcher = asyncio.create_task(_watch_backend(engine.index, health_servicer, metrics))
        else:
            rs._saver = asyncio.create_task(_save_periodically(engine, config.index_save_interval_s))

    rs._loading = asyncio.create_task(load())
    return rs


async def _connect_backend(index: MilvusIndex) -> None:
    """Reach Milvus, retrying while it is unreachable (health stays NOT_SERVING meanwhile); a collection
    made for another model fails startup."""
    delay = 0.25
    while True:
        try:
            await asyncio.to_thread(index.connect)
            return
        except Unavailable as exc:
            log.warning("waiting for Milvus: %s", exc, extra={"retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKEND_RETRY_MAX_S)


async def _watch_backend(index: MilvusIndex, health_servicer: health.aio.HealthServicer, metrics: Metrics) -> None:
    """Health follows Milvus: NOT_SERVING while it cannot be reached (or the collection behind the name is
    gone or made for another model), SERVING again once `index.check` passes (it reloads a collection that
    a Milvus restart released)."""
    serving = True
    while True:
        await asyncio.sleep(BACKEND_CHECK_INTERVAL_S)
        try:
            await asyncio.to_thread(index.check)
            problem = ""
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not serving
            problem = str(exc) or type(exc).__name__
        if serving == (not problem):
            if not problem:
                metrics.index_size.set(index.size)
            continue
        serving = not problem
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # Only the service's own status (readiness): the process itself ("", liveness) is fine, and restarting it
        # would not bring Milvus back (docs/deploy.md: probes).
        await health_servicer.set(SERVICE_NAME, status)
        if serving:
            log.info("Milvus reachable again: serving", extra={"index_size": index.size})
        else:
            log.error("Milvus backend not usable: not serving until it is (%s)", problem, extra={"error": problem})


async def _save_periodically(engine: Engine, interval_s: float) -> None:
    """Snapshot a backend that keeps state in memory (`Snapshotting`); a backend without it needs no timer."""
    index = engine.index
    if not isinstance(index, Snapshotting):
        return
    while True:
        await asyncio.sleep(max(1.0, interval_s / 4))
        try:
            await asyncio.to_thread(index.maybe_save, interval_s)
        except Exception:  # keep serving; the store is durable, the snapshot is an optimisation
            log.exception("index snapshot failed")


async def serve_forever(config: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code (non-zero when loading failed)."""
    rs = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    loading = rs._loading
    assert loading is not None  # start_server began loading
    done, _ = await asyncio.wait({loading, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is not None:
        exc = loading.exception()
        log.error("startup failed: %s", exc, extra={"error": str(exc)})
        print(f"twostage serve: startup failed: {exc}", file=sys.stderr)
        await rs.stop(grace=0)
        return 2
    await waiter
    await rs.stop()
    return 0


async def serve_in_background(config: Config) -> RunningServer:
    """Start and wait until SERVING (for the demo and tests)."""
    rs = await start_server(config)
    try:
        await rs.wait_loaded()
    except BaseException:
        await rs.stop(grace=0)
        raise
    return rs
