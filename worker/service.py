"""A worker process's life: connect → announce → take batches from the inbox and run them →
drain → say goodbye. The stages each live in their own module:

    inbox (reads, resumes, claims) → runner (one job's life) → router (litellm)
        → publisher (chunks; outcomes through the finisher's script: store, publish, ack)

Around them run the heartbeat (the lease) and the cancel listener.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import structlog

from llm_pool_contracts import Heartbeat, Keys
from llm_pool_worker import __version__
from llm_pool_worker.backoff import Stopped, until_redis
from llm_pool_worker.cancellation import CancelListener
from llm_pool_worker.connections import connect, consumer_name, ensure_group, redis_target
from llm_pool_worker.fairness import ParkingInbox, TakingInbox, WaitingRoom, limits_table
from llm_pool_worker.heartbeat import HeartbeatKeeper
from llm_pool_worker.inbox import Inbox, InboxLimits
from llm_pool_worker.lanes import Lane, Slots, merged
from llm_pool_worker.metrics import Metrics
from llm_pool_worker.permissions import AccessRefused, check_worker_access
from llm_pool_worker.publisher import Publisher
from llm_pool_worker.router import ModelRouter
from llm_pool_worker.runner import JobRunner, Stats, now_ms
from llm_pool_worker.settings import Settings

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, settings: Settings, router: ModelRouter, consumer: str | None = None) -> None:
        self.settings = settings
        self.router = router
        self.keys = Keys(settings.prefix)
        self.consumer = consumer or consumer_name()
        self.started_at_ms = now_ms()
        self.target = redis_target(settings)
        self._stopping = asyncio.Event()
        self.failed = False  # a background task died: the process exits non-zero
        self.redis = connect(settings, max_connections=settings.concurrency + 16)
        self.reader = connect(settings, reader=True)
        self.batch_reader = connect(settings, reader=True)  # each lane blocks on a connection of its own
        self.publisher = Publisher(self.redis, self.keys, settings.result_ttl_s, settings.chunk_window_ms / 1000,
                                   (settings.dead_max_len, int(settings.dead_max_age_days * 86_400)))
        self.metrics = Metrics(settings.metrics_tenant_label)
        self.runner = JobRunner(settings, router, self.publisher, self.redis, self.consumer, self._stopping, self.target,
                                self.metrics)
        self.slots = Slots(settings.concurrency, settings.batch_share)
        self.inboxes = self._inboxes()
        self.inbox = self.inboxes[0]
        for inbox in self.inboxes:
            inbox.on_lost = self.runner.lose
            inbox.may_take = lambda: self.publisher.refused_since is None
            inbox.on_redis_error = lambda during: self.metrics.redis_errors.labels(during).inc()
            inbox.on_reclaimed = self.metrics.reclaimed.inc
        self.publisher.on_redis_error = lambda during: self.metrics.redis_errors.labels(during).inc()
        self.metrics.in_flight.set_function(lambda: self.slots.in_use)
        self.heartbeat = HeartbeatKeeper(self.redis, self.keys.worker(self.consumer), settings.heartbeat_s, self._beat)
        self.cancels = CancelListener(self.redis, self.keys.cancel, self.runner.cancel)

    def _inboxes(self) -> list[Inbox]:
        """One inbox per lane; with tenants (the waiting room), two per lane: one parks what the
        lane's stream brings, the other takes jobs in turn into free slots."""
        common = (self.keys, self.consumer, self._limits(), self._stopping, self.target)
        readers = {Lane.INTERACTIVE: self.reader, Lane.BATCH: self.batch_reader}
        if not self.router.config.tenants:
            return [Inbox(self.redis, readers[lane], *common, lane, self.slots) for lane in Lane]
        inboxes: list[Inbox] = []
        for lane in Lane:
            room = WaitingRoom(self.redis, self.keys, lane.value, self.consumer, int(self._limits().stale_after_s * 1000))
            inboxes += [TakingInbox(self.redis, self.redis, *common, lane, self.slots, room=room),
                        ParkingInbox(self.redis, readers[lane], *common, lane, self.slots, room=room)]
        return inboxes

    def _limits(self) -> InboxLimits:
        s = self.settings
        # an entry idle this long has outlived any run of its job: it is claimed whoever holds it
        stale_after_s = 2 * s.job_timeout_s + s.shutdown_grace_s + 6 * s.heartbeat_s
        return InboxLimits(s.concurrency, s.block_ms, s.heartbeat_s / 2, stale_after_s)

    @property
    def stats(self) -> Stats:
        return self.runner.stats

    def stop(self) -> None:
        """Stop taking jobs; in-flight ones get the shutdown grace period. Ends any wait for Redis."""
        self._stopping.set()

    def abort(self) -> None:
        """Stop at once: in-flight jobs stay pending for other workers."""
        self.stop()
        self.runner.abort()

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        log.info("worker starting", consumer=self.consumer, concurrency=self.settings.concurrency, redis=self.target)
        try:
            await until_redis(self._check_access, self._stopping, "start-up", self.target)
            await until_redis(lambda: ensure_group(self.redis, self.keys), self._stopping, "start-up", self.target)
            await until_redis(self._announce_limits, self._stopping, "start-up", self.target)
            self.router.open()
            await until_redis(self.heartbeat.start, self._stopping, "start-up", self.target)
        except Stopped:
            log.info("stopped before redis answered")
            await self._close_connections()
            return
        except AccessRefused:
            await self._close_connections()
            raise
        await self.publisher.start()
        await self.cancels.start()
        sampler = self._serve_metrics()
        for task in self._background():
            task.add_done_callback(self._on_background_end)
        log.info("worker ready", consumer=self.consumer, groups=sorted(self.router.groups))
        if ready is not None:
            await ready()
        try:
            async for batch in merged([inbox.batches() for inbox in self.inboxes]):
                await self.runner.admit(batch)
            await self.runner.drain(self.settings.shutdown_grace_s)
        finally:
            if sampler is not None:
                sampler.cancel()
            await self._say_goodbye()

    async def _announce_limits(self) -> None:
        """The lanes' backlog limits, for clients to enforce as they enqueue (CONTRACT.md §1)."""
        limits = {"max_backlog:interactive": self.settings.max_backlog, "max_backlog:batch": self.settings.max_batch_backlog}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.lanes_config, mapping=limits)  # type: ignore[arg-type]
        if self.router.config.tenants:  # the tenants' limits as the waiting room reads them, replaced whole
            pipe.delete(self.keys.tenant_limits)
            pipe.hset(self.keys.tenant_limits, mapping=limits_table(self.router.config.tenants))  # type: ignore[arg-type]
        await pipe.execute()

    async def _check_access(self) -> None:
        await check_worker_access(self.redis, self.keys, self.consumer)

    def _serve_metrics(self) -> asyncio.Task[None] | None:
        if self.settings.metrics_port is None:
            return None
        self.metrics.serve(self.settings.metrics_port)
        return asyncio.create_task(self.metrics.sample_queue(self.redis, self.keys, self._stopping), name="queue-sampler")

    def _background(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.publisher.task, self.heartbeat.task, self.cancels.task) if t is not None]

    def _on_background_end(self, task: asyncio.Task[None]) -> None:
        """Each background loop survives its own failures; one that ends all the same takes the
        worker down, so that a supervisor restarts it, rather than leave it half alive."""
        if task.cancelled() or self._stopping.is_set():
            return
        self.failed = True
        log.critical("a background task ended; stopping the worker", task=task.get_name(), exc_info=task.exception())
        self.abort()

    async def _say_goodbye(self) -> None:
        self.runner.abort()
        await self.cancels.stop()
        await self.publisher.close(timeout_s=max(5.0, self.settings.shutdown_grace_s))
        await self.heartbeat.stop()
        await self._close_connections()
        stats = self.runner.stats
        log.info("worker stopped", completed=stats.completed, failed=stats.failed)

    async def _close_connections(self) -> None:
        await self.reader.aclose()
        await self.batch_reader.aclose()
        await self.redis.aclose()

    def _beat(self) -> Heartbeat:
        stats = self.runner.stats
        refused = self.publisher.refused_since
        return Heartbeat(
            consumer=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at_ms=self.started_at_ms,
            heartbeat_at_ms=now_ms(),
            in_flight=self.slots.in_use,
            completed=stats.completed,
            failed=stats.failed,
            unwritten=self.publisher.unwritten,
            writes_refused_since_ms=int(refused * 1000) if refused is not None else None,
        )
