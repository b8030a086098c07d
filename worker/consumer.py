"""The consume loop: read jobs from the stream, run each through the router, answer, acknowledge.

One worker process is one consumer of the group. It reads only as many entries as it has free
slots, runs them concurrently, and acknowledges an entry only after its outcome is stored and
published, so that a job whose worker dies is redelivered (CONTRACT.md §4). Around the loop run
the heartbeat, the recovery of dead workers' jobs and the cancel listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts import Done, Error, ErrorCode, Heartbeat, InvalidJob, Job, Keys, Result, Terminal, decode_job
from worker import __version__
from worker.assembly import Completion
from worker.cancellation import CancelListener
from worker.heartbeat import HeartbeatKeeper
from worker.publisher import DeadLetter, Publisher, ReplyChannel
from worker.recovery import Reclaimer, jittered
from worker.router import ModelRouter, RouteError
from worker.settings import Settings

log = structlog.get_logger(__name__)

StreamResponse = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class Entry:
    """A stream entry this consumer owns; ``deliveries`` counts this delivery too."""

    id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1
    stored: bytes | None = None  # the job's outcome, if already stored: looked up at admission
    cancel_flag: bool = False  # its cancel key existed at admission


@dataclass(slots=True)
class Stats:
    completed: int = 0
    failed: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def connect(settings: Settings, *, max_connections: int | None = None, single: bool = False) -> aioredis.Redis:
    """A client; ``single`` gives blocking reads a connection of their own (PITFALLS: redis-py)."""
    return aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=5,
        max_connections=max_connections,
        single_connection_client=single,
    )


async def ensure_group(redis: aioredis.Redis, keys: Keys) -> None:
    try:
        await redis.xgroup_create(keys.jobs, keys.group, id="$", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Worker:
    def __init__(self, settings: Settings, router: ModelRouter, consumer: str | None = None) -> None:
        self.settings = settings
        self.router = router
        self.keys = Keys(settings.prefix)
        self.consumer = consumer or consumer_name()
        self.started_at_ms = now_ms()
        self.stats = Stats()
        self.redis = connect(settings, max_connections=settings.concurrency + 16)
        self.reader = connect(settings, single=True)
        self.publisher = Publisher(self.redis, self.keys, settings.result_ttl_s, settings.chunk_window_ms / 1000)
        self.heartbeat = HeartbeatKeeper(
            self.redis, self.keys.worker(self.consumer), settings.heartbeat_s, self._heartbeat
        )
        # An entry idle this long has outlived any run of its job: claim it whoever holds it.
        stale_after_s = 2 * settings.job_timeout_s + settings.shutdown_grace_s + 6 * settings.heartbeat_s
        self.reclaimer = Reclaimer(self.redis, self.keys, self.consumer, stale_after_s)
        self.cancels = CancelListener(self.redis, self.keys.cancel, self.cancel)
        self._tasks: dict[asyncio.Task[None], Entry] = {}
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._admitting = 0
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        # cancels of jobs not running here (yet): one may arrive between admission and start
        self._cancels_seen: OrderedDict[str, bool] = OrderedDict()

    # ---- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading new jobs; in-flight ones get the shutdown grace period."""
        self._stopping.set()
        self._slot_free.set()

    def abort(self) -> None:
        """Stop at once: in-flight jobs stay pending for other workers."""
        self.stop()
        for task in self._tasks:
            task.cancel()

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        log.info("worker starting", consumer=self.consumer, concurrency=self.settings.concurrency)
        await self._until_redis(lambda: ensure_group(self.redis, self.keys))
        await self.publisher.start()
        await self.heartbeat.start()
        await self.cancels.start()
        recovery = asyncio.create_task(self._recover(), name="recovery")
        log.info("worker ready", consumer=self.consumer, groups=sorted(self.router.groups))
        if ready is not None:
            await ready()
        try:
            await self._consume()
            recovery.cancel()
            await self._drain()
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
            await self.cancels.stop()
            await self.publisher.close(timeout_s=max(5.0, self.settings.shutdown_grace_s))
            await self.heartbeat.stop()
            await self.reader.aclose()
            await self.redis.aclose()
            log.info("worker stopped", completed=self.stats.completed, failed=self.stats.failed)

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            consumer=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at_ms=self.started_at_ms,
            heartbeat_at_ms=now_ms(),
            in_flight=len(self._tasks),
            completed=self.stats.completed,
            failed=self.stats.failed,
        )

    async def _until_redis(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis step until Redis answers: a job read must not be dropped by an outage."""
        for attempt in range(10**9):
            try:
                return await step()
            except REDIS_DOWN as exc:
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                log.warning("redis unavailable, retrying", error=type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ---- taking jobs --------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.settings.concurrency - len(self._tasks) - self._admitting

    async def _consume(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                response = await self.reader.xreadgroup(
                    self.keys.group, self.consumer, {self.keys.jobs: ">"}, count=free, block=self.settings.block_ms
                )
                if failures:
                    await self._resume_own_pending()  # a read cut by the outage may have delivered entries
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing, creating it again")
                await self._until_redis(lambda: ensure_group(self.redis, self.keys))
                continue
            except REDIS_DOWN as exc:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                log.warning("redis unavailable, retrying", error=type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            for _stream, entries in cast(StreamResponse, response or []):
                await self._admit([Entry(entry_id, fields) for entry_id, fields in entries])

    async def _resume_own_pending(self) -> None:
        """Run entries delivered to this consumer that it is not running: a read whose reply was
        lost to a dropped connection. Redis already counts them as ours, and no one else takes
        the jobs of a live worker."""
        try:
            pending = await self.redis.xpending_range(
                self.keys.jobs, self.keys.group, "-", "+", max(1, self._free_slots()), consumername=self.consumer
            )
            response = await self.redis.xreadgroup(
                self.keys.group, self.consumer, {self.keys.jobs: "0"}, count=max(1, self._free_slots())
            )
        except REDIS_DOWN:
            return  # the next read retries
        except ResponseError:
            return  # no group yet
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        running = {entry.id for entry in self._tasks.values()}
        for _stream, entries in cast(StreamResponse, response or []):
            resumed = [Entry(i, f or {}, deliveries[i]) for i, f in entries if i not in running and i in deliveries]
            for entry in resumed:
                log.warning("resuming a job whose delivery was cut off", entry_id=entry.id.decode())
            await self._admit(resumed)

    async def _recover(self) -> None:
        """Claim dead workers' jobs into free slots, every half heartbeat interval."""
        while not self._stopping.is_set():
            try:
                claimed = await self.reclaimer.claim(self._free_slots())
                await self._admit([Entry(entry_id, fields, earlier + 1) for entry_id, fields, earlier in claimed])
            except REDIS_DOWN as exc:
                log.warning("recovery round skipped", error=type(exc).__name__)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    log.error("recovery round failed", error=str(exc))
            await asyncio.sleep(jittered(self.settings.heartbeat_s / 2))

    async def _admit(self, entries: list[Entry]) -> None:
        """Start a batch of entries. One round trip looks up the stored outcomes and cancel keys
        of the whole batch, instead of one per job."""
        jobs: list[tuple[Entry, Job]] = []
        for entry in entries:
            raw = entry.fields.get(b"job")
            try:
                jobs.append((entry, decode_job(raw, self.settings.max_job_bytes)))
            except InvalidJob as exc:
                self._start(entry, self._reject(entry, raw, exc))
        if not jobs:
            return
        self._admitting += len(jobs)
        try:
            keys = [k for _, job in jobs for k in (self.keys.result(job.request_id), self.keys.cancel_flag(job.request_id))]
            found = cast(list[bytes | None], await self._until_redis(lambda: self.redis.mget(keys)))
        finally:
            self._admitting -= len(jobs)
        for i, (entry, job) in enumerate(jobs):
            entry.stored, entry.cancel_flag = found[2 * i], found[2 * i + 1] is not None
            self._start(entry, self._serve(entry, job))

    def _start(self, entry: Entry, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks[task] = entry
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", exc_info=task.exception())

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("waiting for in-flight jobs", in_flight=len(self._tasks), grace_s=self.settings.shutdown_grace_s)
        _, late = await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_grace_s)
        if late:
            log.warning("grace period over; leaving jobs pending for other workers", left=len(late))
            for task in late:
                task.cancel()
            await asyncio.wait(late)

    def cancel(self, request_id: str) -> bool:
        """Stop the job's provider call if this worker runs it; it is answered ``cancelled``."""
        task = self._running.get(request_id)
        if task is None:
            self._cancels_seen[request_id] = True
            while len(self._cancels_seen) > 4096:
                self._cancels_seen.popitem(last=False)
            return False
        log.info("cancelling job", request_id=request_id)
        self._cancelled.add(request_id)
        task.cancel()
        return True

    # ---- one job ------------------------------------------------------------------------

    def first_attempt(self, deliveries: int) -> int:
        """Attempt numbers of a delivery: each delivery owns a block of ``1 + stream_restarts``,
        so that a redelivery always starts above every attempt an earlier delivery could use."""
        return (deliveries - 1) * (1 + self.settings.stream_restarts) + 1

    async def _reject(self, entry: Entry, raw: bytes | None, exc: InvalidJob) -> None:
        log.warning("invalid job", entry_id=entry.id.decode(), request_id=exc.request_id, reason=exc.reason)
        message = f"invalid job: {exc.reason}"
        attempt = self.first_attempt(entry.deliveries)
        reply = self.publisher.channel(exc.request_id, attempt) if exc.request_id else None
        error = Error(request_id=exc.request_id or "", attempt=attempt, code=ErrorCode.INVALID_JOB, message=message)
        dead = DeadLetter(raw, ErrorCode.INVALID_JOB, message, entry.deliveries, self.consumer)
        self.stats.failed += 1
        await self.publisher.outcome(reply, error if reply else None, entry.id, dead)

    async def _serve(self, entry: Entry, job: Job) -> None:
        with structlog.contextvars.bound_contextvars(request_id=job.request_id, tenant_id=job.tenant_id):
            await self._serve_bound(entry, job)

    async def _serve_bound(self, entry: Entry, job: Job) -> None:
        reply = self.publisher.channel(job.request_id, self.first_attempt(entry.deliveries))
        if entry.stored is not None:
            log.info("outcome already stored; answering from the store", deliveries=entry.deliveries)
            await self.publisher.outcome(reply, entry.stored, entry.id)
            return
        task = cast("asyncio.Task[None]", asyncio.current_task())
        self._running[job.request_id] = task
        dead: DeadLetter | None = None
        try:
            if entry.deliveries > self.settings.max_attempts:
                text = f"delivered {entry.deliveries} times, over the limit of {self.settings.max_attempts}"
                message: Terminal = self._error(reply, ErrorCode.TOO_MANY_ATTEMPTS, text)
                dead = DeadLetter(entry.fields.get(b"job"), ErrorCode.TOO_MANY_ATTEMPTS, text, entry.deliveries, self.consumer)
            elif entry.cancel_flag or self._cancels_seen.pop(job.request_id, False):
                message = self._error(reply, ErrorCode.CANCELLED, "cancelled before it started")
            else:
                reply, message = await self._generate(job, reply)
        except asyncio.CancelledError:
            if job.request_id not in self._cancelled:
                raise  # shutdown: the entry stays pending for another worker
            task.uncancel()
            message = self._error(reply, ErrorCode.CANCELLED, "cancelled by the orchestrator")
        finally:
            self._running.pop(job.request_id, None)
            self._cancelled.discard(job.request_id)
        await self._answer(entry, reply, message, dead)

    async def _generate(self, job: Job, reply: ReplyChannel) -> tuple[ReplyChannel, Terminal]:
        """Run the model call within the job's limits; any ending becomes a terminal message.

        A stream that breaks after chunks were sent starts again from scratch as the next
        attempt, ``stream_restarts`` times at most; after that the job ends ``interrupted``.
        """
        limit_s = self.settings.job_timeout_s
        deadline_first = False
        if job.deadline_ms is not None:
            left_s = (job.deadline_ms - now_ms()) / 1000
            if left_s <= 0:
                return reply, self._error(reply, ErrorCode.EXPIRED, "the deadline passed before the job started")
            deadline_first = left_s < limit_s
            limit_s = min(limit_s, left_s)
        log.debug("job started", model=job.model, stream=job.stream, messages=job.messages)
        restarts = self.settings.stream_restarts
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    try:
                        if job.stream:
                            completion = await self.router.stream(job, reply.send_text)
                        else:
                            completion = await self.router.complete(job)
                        break
                    except RouteError as exc:
                        if exc.code != ErrorCode.INTERRUPTED or restarts <= 0:
                            raise
                        restarts -= 1
                        log.warning("stream broke part-way; starting again", attempt=reply.attempt + 1)
                        reply = self.publisher.channel(job.request_id, reply.attempt + 1)
        except RouteError as exc:
            log.info("job failed", code=exc.code, reason=exc.message)
            return reply, self._error(reply, exc.code, exc.message)
        except TimeoutError:
            if deadline_first:
                return reply, self._error(reply, ErrorCode.EXPIRED, "the deadline passed during generation")
            limit = f"{self.settings.job_timeout_s:g} s"
            return reply, self._error(reply, ErrorCode.TIMEOUT, f"the job ran past the worker's limit of {limit}")
        except Exception:
            log.exception("job crashed in the worker")
            return reply, self._error(reply, ErrorCode.INTERNAL, "internal error in the worker")
        log.debug("job answered", content=completion.content)
        return reply, self._answer_message(job, reply, completion)

    @staticmethod
    def _error(reply: ReplyChannel, code: ErrorCode, message: str) -> Error:
        return Error(request_id=reply.request_id, attempt=reply.attempt, code=code, message=message)

    @staticmethod
    def _answer_message(job: Job, reply: ReplyChannel, c: Completion) -> Terminal:
        if job.stream:
            return Done(
                request_id=job.request_id, attempt=reply.attempt, content=c.content, tool_calls=c.tool_calls,
                usage=c.usage, model=job.model, provider_model=c.provider_model, finish_reason=c.finish_reason,
                cost_usd=c.cost_usd, seq=0,  # the publisher sets seq to the chunks it sent
            )
        return Result(
            request_id=job.request_id, attempt=reply.attempt, content=c.content, tool_calls=c.tool_calls,
            usage=c.usage, model=job.model, provider_model=c.provider_model, finish_reason=c.finish_reason,
            cost_usd=c.cost_usd,
        )

    async def _answer(self, entry: Entry, reply: ReplyChannel, message: Terminal, dead: DeadLetter | None) -> None:
        if isinstance(message, Error):
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        await reply.finish(message, entry.id, dead)
        if not isinstance(message, Error):
            log.info("job done", attempt=reply.attempt, chunks=reply.seq, usage=message.usage, provider_model=message.provider_model)
