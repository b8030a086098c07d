"""One job's life, top to bottom: admit → (stored? too many attempts? cancelled? expired?) →
generate, restarting a broken stream → one terminal message → store and acknowledge.

The attempt that is current lives in one place, the :class:`Run`: every terminal message is
made from it, so a job cancelled after a restart is answered in the attempt it is in.
A run ends in one of three ways: with a terminal message; silently, because another worker took
the job over (its lease was lost); or silently at shutdown, leaving the job pending for others.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from llm_pool_contracts import (
    Done,
    Error,
    ErrorCode,
    InvalidJob,
    InvalidMessage,
    Job,
    Result,
    Terminal,
    decode_job,
    decode_reply,
)
from llm_pool_worker.assembly import Completion
from llm_pool_worker.backoff import REDIS_DOWN, Stopped, until_redis
from llm_pool_worker.finisher import DeadLetter, Finish, Outcome
from llm_pool_worker.inbox import Delivery, Owner
from llm_pool_worker.ledger import LedgerEntry, ledger_entry, over_budget
from llm_pool_worker.metrics import Metrics
from llm_pool_worker.publisher import Publisher, ReplyStream
from llm_pool_worker.router import ModelRouter, OnText, RouteError
from llm_pool_worker.settings import Settings

log = structlog.get_logger(__name__)


#: Failures the orchestrator caused, and can fix: logged at INFO. Every other failure is at WARNING.
CALLER_CAUSED = frozenset({ErrorCode.UNKNOWN_MODEL, ErrorCode.BAD_REQUEST, ErrorCode.ANSWER_TOO_LARGE})


class Stop(enum.Enum):
    """Why a running job was told to stop."""

    CANCEL = "cancelled by the orchestrator"  # answered `cancelled`
    LOST = "taken over by another worker"  # ends silently: the new owner answers
    SHUTDOWN = "worker shutting down"  # ends silently: the entry stays pending for another worker


@dataclass(slots=True)
class Stats:
    completed: int = 0
    failed: int = 0


@dataclass(slots=True)
class Lookup:
    """What Redis held for a job when it was admitted."""

    stored: bytes | None = None
    stored_attempt: int = 0
    stored_tenant: str | None = None
    cancelled: bool = False
    over_budget: str | None = None  # why the tenant may not spend more today


@dataclass(slots=True, eq=False)
class Run:
    """One delivery of one job, and the attempt that is current."""

    job: Job
    delivery: Delivery
    reply: ReplyStream
    stop: Stop | None = None
    task: asyncio.Task[None] | None = None
    dead: DeadLetter | None = field(default=None)

    def cancelled(self) -> bool:
        return self.stop is Stop.CANCEL

    private: bool = False  # the id's stored outcome is another tenant's: publish the refusal, store nothing

    def error(self, code: ErrorCode, message: str) -> Error:
        return Error(request_id=self.job.request_id, attempt=self.reply.attempt, code=code, message=message,
                     tenant_id=self.job.tenant_id)


def now_ms() -> int:
    return int(time.time() * 1000)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        router: ModelRouter,
        publisher: Publisher,
        redis: aioredis.Redis,
        consumer: str,
        stop: asyncio.Event,
        target: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.router = router
        self.publisher = publisher
        self.redis = redis
        self.consumer = consumer
        self.stop = stop
        self.target = target
        self.stats = Stats()
        self._runs: dict[bytes, Run] = {}  # by entry id
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- admission ---------------------------------------------------------------------------------

    async def admit(self, batch: list[Delivery]) -> None:
        """Decode a batch and start it. One round trip looks up the stored outcomes and cancel keys
        of the whole batch. A run is registered before that look-up, so that a cancel published
        meanwhile finds it, and one published earlier has set its key (CONTRACT.md §5)."""
        runs: list[Run] = []
        for delivery in batch:
            try:
                job = decode_job(delivery.fields.get(b"job"), self.settings.max_job_bytes)
            except InvalidJob as exc:
                self._spawn(delivery, self._reject(delivery, exc))
                continue
            resumable = job.resumable or self.settings.resumable_streams
            run = Run(job, delivery, self.publisher.stream(job.request_id, self.first_attempt(delivery.deliveries), resumable))
            self._runs[delivery.entry_id] = run
            runs.append(run)
        if not runs:
            return
        try:
            lookups = await self._look_up(runs)
        except Stopped:
            for run in runs:
                self._runs.pop(run.delivery.entry_id, None)
                run.delivery.release()
            return
        for run, lookup in zip(runs, lookups, strict=True):
            run.task = self._spawn(run.delivery, self._life(run, lookup))

    async def _look_up(self, runs: list[Run]) -> list[Lookup]:
        keys = self.publisher.keys
        names = [k for run in runs for k in (keys.result(run.job.request_id), keys.cancel_flag(run.job.request_id))]
        found = cast(list[bytes | None], await until_redis(lambda: self.redis.mget(names), self.stop, "admission", self.target))
        over = await until_redis(lambda: over_budget(self.redis, keys, self._budgets(runs)), self.stop, "admission", self.target)
        lookups = []
        for i in range(len(runs)):
            stored, cancel = found[2 * i], found[2 * i + 1]
            lookups.append(Lookup(cancelled=cancel is not None, over_budget=over.get(runs[i].job.tenant_id)))
            if stored is not None:
                try:
                    reply = decode_reply(stored)
                    lookups[-1].stored, lookups[-1].stored_attempt = stored, reply.attempt
                    lookups[-1].stored_tenant = getattr(reply, "tenant_id", None)
                except InvalidMessage:
                    log.warning("stored outcome unreadable; running the job", request_id=runs[i].job.request_id)
        return lookups

    def _budgets(self, runs: list[Run]) -> dict[str, float]:
        limits = {run.job.tenant_id: self.router.config.limits(run.job.tenant_id).daily_budget_usd for run in runs}
        return {tenant: budget for tenant, budget in limits.items() if budget is not None}

    def first_attempt(self, deliveries: int) -> int:
        """Each delivery owns a block of ``1 + stream_restarts`` attempt numbers, so that a
        redelivery starts above every attempt an earlier delivery could have used."""
        return (deliveries - 1) * (1 + self.settings.stream_restarts) + 1

    # ---- one life -----------------------------------------------------------------------------------

    async def _life(self, run: Run, lookup: Lookup) -> None:
        job = run.job
        with structlog.contextvars.bound_contextvars(request_id=job.request_id, tenant_id=job.tenant_id):
            if run.stop in (Stop.LOST, Stop.SHUTDOWN):  # told before it started
                self._runs.pop(run.delivery.entry_id, None)
                return
            try:
                message = await self._outcome(run, lookup)
            except asyncio.CancelledError:
                log.info("job stopped without an answer", reason=(run.stop or Stop.SHUTDOWN).value)
                raise
            finally:
                self._runs.pop(run.delivery.entry_id, None)
            attempt = lookup.stored_attempt if isinstance(message, bytes) else run.reply.attempt
            outcome = Outcome(run.delivery.ack, job.request_id, attempt, message, run.dead, job.tenant_id, not run.private,
                              self._ledger(job, message) if not run.private else None, "" if run.private else run.reply.log)
            await self._finish(run.delivery, outcome, run.reply, job.model)

    def _ledger(self, job: Job, message: Terminal | bytes) -> LedgerEntry | None:
        """A stored outcome sent again was counted when it was stored."""
        if isinstance(message, bytes):
            return None
        return ledger_entry(self.publisher.keys, job.tenant_id, job.model, message, self.settings.usage_retention_days)

    async def _outcome(self, run: Run, lookup: Lookup) -> Terminal | bytes:
        if lookup.stored is not None and lookup.stored_tenant not in (None, run.job.tenant_id):
            text = "invalid job: its request_id is already used by another tenant's job"
            run.dead, run.private = self._dead_letter(run.delivery, ErrorCode.INVALID_JOB, text), True
            return run.error(ErrorCode.INVALID_JOB, text)
        if lookup.stored is not None:
            log.info("outcome already stored; answering from the store", deliveries=run.delivery.deliveries)
            return lookup.stored
        if run.delivery.deliveries > self.settings.max_attempts:
            text = f"delivered {run.delivery.deliveries} times, over the limit of {self.settings.max_attempts}"
            run.dead = self._dead_letter(run.delivery, ErrorCode.TOO_MANY_ATTEMPTS, text)
            return run.error(ErrorCode.TOO_MANY_ATTEMPTS, text)
        if lookup.cancelled or run.cancelled():
            return run.error(ErrorCode.CANCELLED, "cancelled before it started")
        if lookup.over_budget is not None:
            log.info("job refused: daily budget spent", reason=lookup.over_budget)
            return run.error(ErrorCode.QUOTA_EXCEEDED, lookup.over_budget)
        try:
            return await self._generate(run)
        except asyncio.CancelledError:
            if not run.cancelled():
                raise
            cast("asyncio.Task[None]", asyncio.current_task()).uncancel()
            return run.error(ErrorCode.CANCELLED, "cancelled by the orchestrator")

    async def _generate(self, run: Run) -> Terminal:
        """The model call within the job's time limits; every ending becomes a terminal message."""
        limit_s, deadline_first = self._time_limit(run.job)
        if limit_s <= 0:
            return run.error(ErrorCode.EXPIRED, "the deadline passed before the job started")
        log.debug("job started", model=run.job.model, stream=run.job.stream, messages=run.job.messages)
        try:
            async with asyncio.timeout(limit_s):
                completion = await self._call(run)
        except RouteError as exc:
            # the operator's concern (providers, keys, limits) at WARNING, so that an alert on WARNING sees it
            level = log.info if exc.code in CALLER_CAUSED else log.warning
            level("job failed", code=exc.code, reason=exc.message, model=run.job.model)
            return run.error(exc.code, exc.message)
        except TimeoutError:
            if deadline_first:
                return run.error(ErrorCode.EXPIRED, "the deadline passed during generation")
            return run.error(ErrorCode.TIMEOUT, f"the job ran past the worker's limit of {self.settings.job_timeout_s:g} s")
        except Exception:
            log.exception("job crashed in the worker")
            return run.error(ErrorCode.INTERNAL, "internal error in the worker")
        log.debug("job answered", content=completion.content)
        return answer_message(run, completion)

    async def _call(self, run: Run) -> Completion:
        """A stream that breaks after chunks were sent starts again from scratch as the next
        attempt, ``stream_restarts`` times at most; after that the job ends ``interrupted``."""
        restarts = self.settings.stream_restarts
        group = run.job.model
        while True:
            started = time.monotonic()
            try:
                if run.job.stream:
                    return await self.router.stream(run.job, self._timed(run, started))
                return await self.router.complete(run.job)
            except RouteError as exc:
                if not exc.restart or restarts <= 0:
                    raise
            finally:
                self.metrics.call_seconds.labels(group).observe(time.monotonic() - started)
            restarts -= 1  # only a stream that broke after chunks, with restarts left, gets here
            self.metrics.restarts.labels(group).inc()
            await self._keep_lease(run)
            run.reply = self.publisher.stream(run.job.request_id, run.reply.attempt + 1, bool(run.reply.log))
            log.warning("stream broke part-way; starting again", attempt=run.reply.attempt)

    def _timed(self, run: Run, started: float) -> OnText:
        """The attempt's text sink, noting the time to its first token."""
        send, first = run.reply.send_text, True

        def on_text(text: str) -> bool:
            nonlocal first
            if first:
                first = False
                self.metrics.ttft_seconds.labels(run.job.model).observe(time.monotonic() - started)
            return send(text)

        return on_text

    async def _keep_lease(self, run: Run) -> None:
        """Before another paid call, ask who owns the job: a worker that was paused, or cut off from
        Redis, past its lease learns here that another worker took the job over, or answered it."""
        owner = await run.delivery.owner()
        if owner is Owner.NOBODY:
            try:
                answered = await self.redis.exists(self.publisher.keys.result(run.job.request_id))
            except REDIS_DOWN:
                answered = 0  # cannot tell: go on, the finisher fences the outcome anyway
            owner = Owner.ANOTHER if answered else Owner.THIS_WORKER  # else its stream was deleted: answer it
        if owner is Owner.ANOTHER:
            self._stop(run, Stop.LOST)
            await asyncio.sleep(0)  # the cancel lands here

    def _time_limit(self, job: Job) -> tuple[float, bool]:
        """Seconds the job may run, and whether its deadline (not the worker's limit) sets them."""
        limit_s = self.settings.job_timeout_s
        if job.deadline_ms is None:
            return limit_s, False
        left_s = (job.deadline_ms - now_ms()) / 1000
        return min(limit_s, left_s), left_s < limit_s

    # ---- endings ------------------------------------------------------------------------------------

    async def _reject(self, delivery: Delivery, exc: InvalidJob) -> None:
        log.warning("invalid job", entry_id=delivery.entry_id.decode(), request_id=exc.request_id, reason=exc.reason)
        text = f"invalid job: {exc.reason}"
        attempt = self.first_attempt(delivery.deliveries)
        rid = exc.request_id
        error = Error(request_id=rid, attempt=attempt, code=ErrorCode.INVALID_JOB, message=text) if rid else None
        dead = self._dead_letter(delivery, ErrorCode.INVALID_JOB, text)
        await self._finish(delivery, Outcome(delivery.ack, rid, attempt, error, dead), None)

    def _dead_letter(self, delivery: Delivery, code: ErrorCode, text: str) -> DeadLetter:
        log.warning("job dead-lettered", entry_id=delivery.entry_id.decode(), code=code.value, attempts=delivery.deliveries,
                    reason=text)
        return DeadLetter(delivery.fields.get(b"job"), code, text, delivery.deliveries, self.consumer,
                          self.settings.max_job_bytes, delivery.lane.value)

    async def _finish(self, delivery: Delivery, outcome: Outcome, reply: ReplyStream | None, group: str = "") -> None:
        delivery.finishing = True
        result = await self.publisher.finish(outcome, reply)
        if result is not Finish.FINISHED:
            log.warning("outcome not written", result=result.value, attempt=outcome.attempt)
            return
        message = outcome.message
        if message is not None and not isinstance(message, bytes):
            self.metrics.finished(group, outcome.tenant_id or "", message, outcome.dead is not None)
        if isinstance(message, Error) or message is None:
            self.stats.failed += 1
        elif not isinstance(message, bytes):
            self.stats.completed += 1
            if delivery.ack.running and self.router.config.limits(outcome.tenant_id or "").tpm:
                await self._count_tokens(outcome.tenant_id or "", message.usage.prompt_tokens + message.usage.completion_tokens)
            log.info("job done", attempt=outcome.attempt, chunks=reply.seq if reply else 0,
                     usage=msgspec.structs.asdict(message.usage), cost_usd=message.cost_usd,
                     model=message.model, provider_model=message.provider_model)

    async def _count_tokens(self, tenant_id: str, tokens: int) -> None:
        """A tenant's tokens this minute, for the waiting room's ``tpm`` limit. Counted after the
        outcome is stored, apart from it: a count lost to a crash loosens a rate limit a little,
        and never bills anyone."""
        key = f"{self.publisher.keys.tenant(tenant_id)}tpm:{int(time.time() // 60)}"
        with contextlib.suppress(*REDIS_DOWN, RedisError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.incrby(key, tokens)
            pipe.expire(key, 120)
            await pipe.execute()

    # ---- stopping runs ------------------------------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """Stop the job's provider call if this worker runs it; it is answered ``cancelled``."""
        runs = [run for run in self._runs.values() if run.job.request_id == request_id]
        for run in runs:
            log.info("cancelling job", request_id=request_id)
            self._stop(run, Stop.CANCEL)
        return bool(runs)

    def lose(self, deliveries: list[Delivery]) -> None:
        """Another worker owns these jobs now: stop them without a word."""
        for delivery in deliveries:
            run = self._runs.get(delivery.entry_id)
            if run is not None:
                self._stop(run, Stop.LOST)

    def _stop(self, run: Run, why: Stop) -> None:
        if run.stop is None:
            run.stop = why
        if run.task is not None and not run.task.done():
            run.task.cancel()

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish within the grace period; stop the rest (they stay pending)."""
        if not self._tasks:
            return
        log.info("waiting for in-flight jobs", in_flight=len(self._tasks), grace_s=grace_s)
        _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
        if late:
            log.warning("grace period over; leaving jobs pending for other workers", left=len(late))
            self.abort()
            await asyncio.wait(late)

    def abort(self) -> None:
        for run in list(self._runs.values()):
            self._stop(run, Stop.SHUTDOWN)
        for task in self._tasks:
            task.cancel()

    def _spawn(self, delivery: Delivery, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, delivery))
        return task

    def _ended(self, task: asyncio.Task[None], delivery: Delivery) -> None:
        self._tasks.discard(task)
        delivery.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", exc_info=task.exception())


def answer_message(run: Run, c: Completion) -> Terminal:
    job, attempt = run.job, run.reply.attempt
    if job.stream:
        return Done(
            request_id=job.request_id, attempt=attempt, content=c.content, tool_calls=c.tool_calls, usage=c.usage,
            model=job.model, provider_model=c.provider_model, finish_reason=c.finish_reason, cost_usd=c.cost_usd,
            tenant_id=job.tenant_id, seq=0,  # the publisher sets seq to the chunks it sent
        )
    return Result(
        request_id=job.request_id, attempt=attempt, content=c.content, tool_calls=c.tool_calls, usage=c.usage,
        model=job.model, provider_model=c.provider_model, finish_reason=c.finish_reason, cost_usd=c.cost_usd,
        tenant_id=job.tenant_id,
    )
