"""``create_app(settings)``: the gateway's FastAPI application and its lifespan.

The lifespan owns every background resource: a bounded Redis connection pool, the event dispatcher
(one pub/sub subscription), the canceller and the tokenizer threads; all are stopped on shutdown.
The gateway starts even if Redis is down (``/ready`` says so, requests get 503) and connects when
Redis comes up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from gateway import errors, native_routes, openai_routes, system_routes
from gateway.admission import Admission
from gateway.canceller import Canceller
from gateway.dispatcher import Dispatcher
from gateway.metrics import GatewayMetrics, MetricsMiddleware, RedisSampler
from gateway.middleware import RequestContextMiddleware
from gateway.ratelimit import Limits, RateLimitHeadersMiddleware
from gateway.service import Gateway
from gateway.tokenization import TokenizerCache
from gateway.workers import WorkerRegistry
from protocol.artifacts import ArtifactStore
from protocol.errors import APIError, document_validation_errors_as_400, unavailable
from protocol.settings import GatewaySettings

log = logging.getLogger("gateway")

REDIS_POOL_SIZE = 64

DESCRIPTION = """OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and native
endpoints (`/generate`, `/stream`, `/completion`) in front of spindle's Redis job queue. Every error is
`{"error": {"message", "type", "param", "code"}}`."""


def create_redis(settings: GatewaySettings) -> aioredis.Redis:
    """A bounded pool; commands fail within seconds (a couple of quick retries) when Redis is down."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=REDIS_POOL_SIZE, timeout=5, socket_timeout=5,
        socket_connect_timeout=2, health_check_interval=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2))
    return aioredis.Redis(connection_pool=pool)


async def warm_up(gw: Gateway) -> None:
    """Import transformers and load the default model's tokenizer before the first request needs it
    (importing transformers alone takes seconds). ``/ready`` waits for this to end, however it ends."""
    try:
        await gw.tokenizers.get(gw.settings.default_model)
    except APIError as e:
        log.warning("could not preload the tokenizer of %s: %s", gw.settings.default_model, e.message)
    except Exception:
        log.exception("could not preload the tokenizer of %s", gw.settings.default_model)


async def drain(app: FastAPI, timeout: float, poll: float = 0.1, cut_grace: float = 2.0) -> bool:
    """Stop admitting (``/ready`` and new requests answer 503) and wait until no admitted request is
    in flight on this gateway, at most ``timeout`` seconds. Past it, what is still open ends with a 503
    ``shutting_down`` (a stream gets it as its last event, then ``[DONE]``) and its job is cancelled.
    True when everything finished within the timeout."""
    gw: Gateway | None = getattr(app.state, "gateway", None)
    if gw is None:  # the lifespan has not started: nothing to drain
        return True
    gw.draining = True
    log.info("draining: %d request(s) in flight, waiting up to %gs", gw.admission.total_in_flight, timeout)
    if await _until_idle(gw, timeout, poll):
        log.info("drained")
        return True
    log.warning("drain timeout (%gs): ending the %d request(s) still open", timeout, gw.admission.total_in_flight)
    gw.dispatcher.fail_all(unavailable(f"The gateway is shutting down and could not finish this request within "
                                       f"{timeout:g}s; retry it", retry_after=1, code="shutting_down"))
    await _until_idle(gw, cut_grace, poll)
    return False


async def _until_idle(gw: Gateway, timeout: float, poll: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while gw.admission.total_in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(poll)
    return not gw.admission.total_in_flight


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = create_redis(settings)
        gw = Gateway(
            settings=settings, redis=redis,
            dispatcher=Dispatcher(settings.redis_url, settings.gateway_id),
            canceller=Canceller(redis, ttl_seconds=int(settings.request_timeout) + 60),
            tokenizers=TokenizerCache(ArtifactStore(settings.artifacts_dir, settings.bundled_models_dir)),
            workers=WorkerRegistry(redis),
            admission=Admission(redis, settings.api_keys, settings.max_concurrent_requests,
                                settings.queue_capacity,
                                rate_limits=Limits(settings.rate_limit_rpm, settings.rate_limit_tpm),
                                key_limits=settings.api_key_limits,
                                on_reject=lambda reason: metrics.rejections.labels(reason).inc()),
            metrics=metrics)
        app.state.gateway = gw
        await gw.dispatcher.start(timeout=5.0)
        gw.canceller.start()
        gw.warm_up = asyncio.create_task(warm_up(gw), name="tokenizer-warm-up")
        sampler = RedisSampler(metrics, redis, settings.queue_metrics_interval,
                               settings.queue_capacity)
        sampler.start()
        log.info("gateway %s up (redis %s, default model %s)", settings.gateway_id, settings.redis_url,
                 settings.default_model, extra={"gateway_id": settings.gateway_id})
        try:
            yield
        finally:
            gw.draining = True
            await sampler.stop()
            await gw.canceller.stop()
            await gw.dispatcher.stop()
            gw.tokenizers.close()
            await redis.aclose(close_connection_pool=True)
            log.info("gateway %s stopped", settings.gateway_id)

    app = FastAPI(title="spindle gateway", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(native_routes.router)
    app.include_router(system_routes.router)
    app.add_middleware(RateLimitHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it also sees 413s
    document_validation_errors_as_400(app)
    return app
