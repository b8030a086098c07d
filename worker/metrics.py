"""Prometheus metrics of one worker process, served on ``LLM_WORKER_METRICS_PORT`` when it is set.

Labels stay bounded: model group, outcome (``done``, ``result`` or an error code), error code,
and the tenant only when ``LLM_WORKER_METRICS_TENANT_LABEL`` is on. Never a request id. The
queue figures are sampled from Redis at most once a second, only while metrics are served.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from llm_pool_contracts import LANES, Error, Keys, Terminal
from llm_pool_worker.backoff import REDIS_DOWN
from llm_pool_worker.connections import group_figures

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, tenant_label: bool = False) -> None:
        self.tenant_label = tenant_label
        self.registry = r = CollectorRegistry()
        who = ["group", "tenant"] if tenant_label else ["group"]
        self.jobs = Counter("llm_worker_jobs", "Jobs finished, by outcome: done, result, or the error code", ["outcome", *who], registry=r)
        self.in_flight = Gauge("llm_worker_jobs_in_flight", "Jobs this worker holds now", registry=r)
        self.call_seconds = Histogram("llm_worker_provider_call_seconds", "A job's model calls, start to last token",
                                      ["group"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("llm_worker_time_to_first_token_seconds", "A streamed job's start to its first token",
                                      ["group"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llm_worker_tokens", "Tokens of answers, by direction: prompt or completion", ["direction", *who], registry=r)
        self.cost = Counter("llm_worker_cost_usd", "Cost of answers, in US dollars (priced deployments only)", who, registry=r)
        self.restarts = Counter("llm_worker_stream_restarts", "Streams that broke after tokens and started again", ["group"], registry=r)
        self.reclaimed = Counter("llm_worker_reclaimed_jobs", "Jobs taken over from dead workers", registry=r)
        self.dead_letters = Counter("llm_worker_dead_letters", "Jobs dead-lettered, by error code", ["code"], registry=r)
        self.redis_errors = Counter("llm_worker_redis_errors", "Redis commands that failed or were refused", ["during"], registry=r)
        lane = ["lane"]
        self.queue_lag = Gauge("llm_worker_queue_lag_entries", "Job stream entries not yet delivered to any worker", lane, registry=r)
        self.queue_pending = Gauge("llm_worker_queue_pending_entries", "Delivered entries not yet acknowledged", lane, registry=r)
        self.oldest_pending = Gauge("llm_worker_queue_oldest_pending_seconds", "Age of the oldest unacknowledged entry", lane,
                                    registry=r)

    def finished(self, group: str, tenant: str, message: Terminal, dead: bool) -> None:
        """One job's stored terminal message."""
        who = [group, tenant] if self.tenant_label else [group]
        if isinstance(message, Error):
            self.jobs.labels(message.code, *who).inc()
            if dead:
                self.dead_letters.labels(message.code).inc()
            return
        self.jobs.labels(message.__struct_config__.tag, *who).inc()
        self.tokens.labels("prompt", *who).inc(message.usage.prompt_tokens)
        self.tokens.labels("completion", *who).inc(message.usage.completion_tokens)
        if message.cost_usd:
            self.cost.labels(*who).inc(message.cost_usd)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
        log.info("metrics served", port=port)

    async def sample_queue(self, redis: aioredis.Redis, keys: Keys, stop: asyncio.Event) -> None:
        """Each lane's lag, pending entries and the oldest one's age, once a second."""
        while not stop.is_set():
            with contextlib.suppress(*REDIS_DOWN, aioredis.ResponseError):
                await self._sample(redis, keys)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _sample(self, redis: aioredis.Redis, keys: Keys) -> None:
        for lane, stream in zip(LANES, keys.lanes(), strict=True):
            lag, pending, oldest_s = await group_figures(redis, stream, keys.group)
            if lag is not None:
                self.queue_lag.labels(lane).set(lag)
            self.queue_pending.labels(lane).set(pending)
            self.oldest_pending.labels(lane).set(max(0.0, oldest_s or 0.0))
