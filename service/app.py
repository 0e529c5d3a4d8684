"""The FastAPI application factory: `create_app(settings)` wires routes, auth, errors and metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI
from redis.exceptions import RedisError

from fleet.capacity import CapacityStore
from fleet.files import FileStore
from fleet.queue import JobStore
from fleet.quotas import QuotaStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from fleet.tenants import TenantStore
from fleet.webhook_delivery import Deliverer
from service.body_limit import BodyLimitMiddleware
from service.errors import LastResortMiddleware, install_error_handlers
from service.log_context import LogContextMiddleware
from service.metrics import APIMetrics, MetricsMiddleware, SchedulerCollector
from service.openapi import install_openapi
from service.routes import adapters, admin, dashboard, files, health, jobs, models, webhooks
from service.uploads import remove_stale_spool_files

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

API_VERSION = "0.1.0"

# Live event streams (SSE) each hold a thread while they wait on Redis; they get their own pool.
MAX_CONCURRENT_STREAMS = 256


def _connect_scheduler(app: FastAPI, settings: Settings, stop: threading.Event) -> None:
    """Build the stores that touch Redis when built (the job store brings the scheduler's state up to
    date; the quota store writes the default quota), write the fair-share half-life, then hand them to
    the routes (`app.state.jobs`, `app.state.quotas`).

    Retried every 2 s while Redis is unreachable, so the API still starts (and answers 503) without it.
    """
    while not stop.is_set():
        try:
            jobs = JobStore(app.state.redis, max_attempts=settings.max_attempts,
                            events_max_len=settings.events_max_len, idempotency_ttl_s=settings.idempotency_ttl_s,
                            fair_share_half_life_s=settings.fair_share_half_life_s,
                            starvation_guard_s=settings.starvation_guard_s,
                            legacy_job_gpus=settings.legacy_job_gpus)
            quotas = QuotaStore(app.state.redis, default=settings.default_quota)
        except RedisError as e:
            logger.warning("cannot reach Redis to set up the scheduler's state yet, retrying in 2 s: %s", e)
            stop.wait(2.0)
            continue
        app.state.jobs, app.state.quotas = jobs, quotas
        return


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def create_app(settings: Settings) -> FastAPI:
    """Build the API for `settings`.

    The catalog is read here, so a broken catalog fails at start-up with its own message. The Redis
    client and the object store are built when the app starts (lifespan) and closed when it stops;
    routes reach them through `service.deps`.
    """
    catalog = load_catalog(settings)
    metrics = APIMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_redis(settings)
        store = make_object_store(settings)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        app.state.redis = client
        app.state.store = store
        app.state.tenants = TenantStore(client, admin_key=admin_key)
        app.state.files = FileStore(client, store, max_upload_bytes=settings.max_upload_bytes)
        app.state.registry = AdapterRegistry(client, store)
        app.state.capacity = CapacityStore(client)
        app.state.jobs = app.state.quotas = None  # set by _connect_scheduler once Redis answers
        stop_connecting = threading.Event()
        connector = threading.Thread(target=_connect_scheduler, args=(app, settings, stop_connecting),
                                     name="connect-scheduler", daemon=True)
        connector.start()
        await anyio.to_thread.run_sync(connector.join, 2.0)  # done at once when Redis is up
        app.state.stream_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_STREAMS)
        stale = remove_stale_spool_files(Path(settings.data_dir) / "tmp")
        if stale:
            logger.info("removed %d stale spooled upload/download file(s)", stale)
        # The scheduler gauges, once the scheduler state is set up in Redis (app.state.jobs).
        collector = SchedulerCollector(lambda: app.state.redis if app.state.jobs is not None else None)
        metrics.registry.register(collector)
        # The deliverer has its own client: its blocking outbox reads never wait for a request's connection.
        deliverer_client = make_redis(settings) if settings.webhook_deliverer_in_api else None
        deliverer = Deliverer(deliverer_client, settings) if deliverer_client is not None else None
        if deliverer is not None:
            deliverer.start()
        logger.info(
            "lorafleet API ready: redis %s, %s object store, %d base model(s): %s",
            _without_password(settings.redis_url),
            settings.object_store,
            len(catalog),
            ", ".join(catalog.names()) or "none",
        )
        try:
            yield
        finally:
            stop_connecting.set()
            if deliverer is not None and deliverer_client is not None:
                deliverer.stop()
                deliverer_client.close()
            metrics.registry.unregister(collector)
            client.close()

    app = FastAPI(
        title="lorafleet",
        version=API_VERSION,
        description="Multi-tenant LoRA fine-tuning, compatible with OpenAI's fine-tuning API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.started_at = int(time.time())
    app.state.catalog = catalog
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outside the body limit, so it sees every answer
    app.add_middleware(LogContextMiddleware)  # log lines of a job's requests name it (fleet.log_format)
    app.add_middleware(LastResortMiddleware)  # added last: outermost, so no exception reaches uvicorn
    install_error_handlers(app)
    install_openapi(app)

    app.include_router(health.router)
    app.include_router(files.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(adapters.router, prefix="/v1")
    app.include_router(admin.router, prefix="/v1")
    app.include_router(webhooks.router, prefix="/v1")
    app.include_router(dashboard.router)  # static files only; data comes through /v1
    return app
