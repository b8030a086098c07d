"""The orchestrator's client: enqueue a job and read its replies (CONTRACT.md).

It imports redis and ``contracts``, never litellm or the worker. One pub/sub connection serves
every request of a client. Each request subscribes to its reply channel *before* its job is
enqueued, so no token is lost, and falls back to the stored outcome (§3) when the channel stays
quiet, so that a subscription that missed the end (a reconnect) still gets it.

A job never outlives the client's interest in it: it carries a deadline (the caller's, or now +
the timeout), and when the client stops waiting without an answer (its timeout, or the caller
gave up) it cancels the job (§5), so that nobody is billed for an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Self, cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from llm_pool_client.enqueue import ENQUEUE_SCRIPT, QueueFull
from llm_pool_client.usage import UsageRow, read_usage
from llm_pool_contracts import (
    Chunk,
    Done,
    Error,
    InvalidMessage,
    Job,
    Keys,
    Params,
    Reply,
    Result,
    decode_reply,
    encode,
)

__all__ = ["JobFailed", "LLMClient", "QueueFull", "ReplyTimeout", "UsageRow", "make_job"]

QUIET_POLL_S = 1.0  # this long without a message on the channel: read the stored outcome


class JobFailed(Exception):
    """The job ended in an ``error`` message."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.code = error.code
        self.message = error.message


class ReplyTimeout(TimeoutError):
    """No terminal message arrived within the caller's timeout."""


class _ReplyHub:
    """Shares one pub/sub connection among all requests; routes messages by channel."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pubsub = redis.pubsub()
        self._queues: dict[bytes, asyncio.Queue[bytes]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def open(self, channel: str) -> asyncio.Queue[bytes]:
        key = channel.encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        confirmed = asyncio.get_running_loop().create_future()
        self._queues[key] = queue
        self._confirmed[key] = confirmed
        async with self._lock:
            await self._pubsub.subscribe(channel)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(), name="reply-hub")
        await confirmed
        return queue

    async def close(self, channel: str, queue: asyncio.Queue[bytes]) -> None:
        """Stop reading ``channel`` for the request that opened ``queue``; a later request that
        opened the same channel again (a resume) keeps it."""
        key = channel.encode()
        if self._queues.get(key) is not queue:
            return
        self._queues.pop(key, None)
        self._confirmed.pop(key, None)
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError):
                await asyncio.sleep(0.2)  # redis-py reconnects and subscribes again on the next read
                continue
            if message is None:
                continue
            channel = message["channel"]
            if message["type"] == "subscribe":
                confirmed = self._confirmed.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message":
                queue = self._queues.get(channel)
                if queue is not None:
                    queue.put_nowait(message["data"])


class LLMClient:
    """Submit completion jobs to the worker pool and read their answers."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "llm", *, owns_redis: bool = False) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._hub = _ReplyHub(redis)
        self._owns_redis = owns_redis
        self._enqueue = redis.register_script(ENQUEUE_SCRIPT)

    @classmethod
    def from_url(cls, url: str, prefix: str = "llm", **redis_kwargs: Any) -> Self:
        return cls(aioredis.Redis.from_url(url, **redis_kwargs), prefix, owns_redis=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._hub.aclose()
        if self._owns_redis:
            await self.redis.aclose()

    # ---- building blocks -----------------------------------------------------------------

    async def ensure_group(self) -> None:
        for stream in self.keys.lanes():
            try:
                await self.redis.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, job: Job, priority: str = "interactive") -> str:
        """Add the job to its lane's stream without waiting for it; returns the entry id. Raises
        :class:`QueueFull` when the lane's backlog is at the operator's limit."""
        stream = self.keys.lane(priority)
        status, *rest = await self._enqueue(keys=[stream, self.keys.lanes_config], args=[self.keys.group, priority, encode(job)])
        if status == b"full":
            raise QueueFull(priority, int(rest[0]), int(rest[1]))
        entry_id = rest[0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def cancel(self, request_id: str, ttl_s: int = 3600) -> None:
        """Cancel a job, whether it runs now or has not started yet (CONTRACT.md §5)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.cancel_flag(request_id), 1, ex=ttl_s)
        pipe.publish(self.keys.cancel, request_id)
        await pipe.execute()

    async def usage(
        self, tenant_id: str | None = None, since: str | dt.date | None = None, until: str | dt.date | None = None
    ) -> list[UsageRow]:
        """The usage ledger (CONTRACT.md §8): one row per tenant, UTC day and model group, for
        ``since`` ≤ day ≤ ``until``; counted by the workers as each reply is stored, once."""
        return await read_usage(self.redis, self.keys, tenant_id, since, until)

    async def stored_outcome(self, request_id: str) -> Reply | None:
        raw = await self.redis.get(self.keys.result(request_id))
        return decode_reply(raw) if raw is not None else None

    async def replies(self, job: Job, timeout: float, priority: str = "interactive") -> AsyncGenerator[Reply, None]:
        """Enqueue ``job`` and yield its replies up to the terminal one, keeping only the newest attempt.

        A reply of a higher ``attempt`` means generation started again: text of older attempts is
        void. A chunk seen already (a publish repeated after a reconnect) is not yielded again.
        If this ends without a terminal reply (timeout, or the caller stopped), the job is cancelled.
        """
        self.keys.lane(priority)  # an unknown lane is refused before anything is sent
        channel = self.keys.reply(job.request_id)
        queue = await self._hub.open(channel)
        answered = False
        try:
            try:
                await self.enqueue(job, priority)
            except QueueFull:
                answered = True  # nothing was enqueued: nothing to cancel
                raise
            seen = _Seen()
            async for reply in self._wait(job.request_id, queue, timeout):
                if seen.fresh(reply):
                    answered = not isinstance(reply, Chunk)
                    yield reply
                    if answered:
                        return
        finally:
            if not answered and not job.resumable:  # a resumable job runs on, for whoever resumes it
                await self._give_up(job.request_id)
            await self._hub.close(channel, queue)

    async def resume(self, request_id: str, after: tuple[int, int] = (0, 0), timeout: float = 600.0) -> AsyncGenerator[Chunk | Done, None]:
        """A resumable job's replies after ``after`` = (attempt, seq) of the last chunk seen: those
        kept so far, then the live rest, with no gap and nothing twice (CONTRACT.md §2). As in
        :meth:`stream`, a chunk of a higher attempt means the text so far is void. Leaving early
        does not cancel the job."""
        channel = self.keys.reply(request_id)
        queue = await self._hub.open(channel)  # subscribed before reading what is kept: nothing falls between
        try:
            seen = _Seen()
            seen.attempt, seen.seq = after
            async for reply in self._kept_then_live(request_id, queue, timeout):
                if not seen.fresh(reply):
                    continue
                if isinstance(reply, Error):
                    raise JobFailed(reply)
                yield Done(**msgspec.structs.asdict(reply), seq=0) if isinstance(reply, Result) else reply
                if not isinstance(reply, Chunk):
                    return
        finally:
            await self._hub.close(channel, queue)

    async def _kept_then_live(self, request_id: str, queue: asyncio.Queue[bytes], timeout: float) -> AsyncIterator[Reply]:
        kept = cast(list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrange(self.keys.chunks(request_id)))
        for _entry_id, fields in kept:
            with contextlib.suppress(InvalidMessage):
                yield decode_reply(fields[b"m"])
        async for reply in self._wait(request_id, queue, timeout):
            yield reply

    async def _wait(self, request_id: str, queue: asyncio.Queue[bytes], timeout: float) -> AsyncIterator[Reply]:
        """Messages of the channel, and the stored outcome whenever the channel stays quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                raw = await asyncio.wait_for(queue.get(), timeout=max(0.0, min(left, QUIET_POLL_S)))
            except TimeoutError:
                try:
                    stored = await self.stored_outcome(request_id)
                except (RedisError, OSError):
                    stored = None  # Redis is away: keep waiting, within the caller's timeout
                if stored is not None:
                    yield stored
                if loop.time() >= deadline:
                    raise ReplyTimeout(f"no answer to {request_id} within {timeout:g} s") from None
                continue
            with contextlib.suppress(InvalidMessage):
                yield decode_reply(raw)

    async def _give_up(self, request_id: str) -> None:
        """Cancel a job whose answer nobody waits for any more; best effort, never raises."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.cancel(request_id))

    # ---- the two calls an orchestrator makes ---------------------------------------------

    async def complete(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tenant_id: str,
        request_id: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Params | None = None,
        deadline_ms: int | None = None,
        timeout: float = 600.0,
        priority: str = "interactive",
    ) -> Result:
        """One whole answer; raises :class:`JobFailed` on an ``error`` reply, :class:`ReplyTimeout`
        after ``timeout`` seconds, :class:`QueueFull` when the lane is full. Without ``deadline_ms``
        the job's deadline is now + ``timeout``. ``priority="batch"`` puts it in the batch lane."""
        job = make_job(model, messages, tenant_id, request_id, tools, params, deadline_ms or _deadline(timeout), stream=False)
        async with contextlib.aclosing(self.replies(job, timeout, priority)) as replies:
            async for reply in replies:
                if isinstance(reply, Error):
                    raise JobFailed(reply)
                if isinstance(reply, Result):
                    return reply
        raise ReplyTimeout(f"no result for {job.request_id}")  # pragma: no cover - replies() raises first

    async def stream(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tenant_id: str,
        request_id: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Params | None = None,
        deadline_ms: int | None = None,
        timeout: float = 600.0,
        priority: str = "interactive",
        resumable: bool = False,
    ) -> AsyncIterator[Chunk | Done]:
        """Chunks as they arrive, then ``Done``; raises :class:`JobFailed` on an ``error`` reply.

        When a chunk's ``attempt`` is higher than the one before, the job started again after a
        failure: discard the text received so far. Without ``deadline_ms`` the job's deadline is
        now + ``timeout``; leaving the loop early cancels the job, unless it is ``resumable``: then
        its replies are kept too, and :meth:`resume` picks them up where a reader left off.
        """
        job = make_job(model, messages, tenant_id, request_id, tools, params, deadline_ms or _deadline(timeout), stream=True,
                       resumable=resumable)
        async with contextlib.aclosing(self.replies(job, timeout, priority)) as replies:
            async for reply in replies:
                if isinstance(reply, Error):
                    raise JobFailed(reply)
                if isinstance(reply, Result):  # a reused request_id answered by a stored whole answer (§1)
                    yield Done(**msgspec.structs.asdict(reply), seq=0)
                else:
                    yield reply


def make_job(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    tenant_id: str,
    request_id: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
    params: Params | None,
    deadline_ms: int | None,
    *,
    stream: bool,
    resumable: bool = False,
) -> Job:
    return Job(
        request_id=request_id or uuid.uuid4().hex,
        tenant_id=tenant_id,
        model=model,
        messages=[dict(m) for m in messages],
        stream=stream,
        tools=[dict(t) for t in tools] if tools else None,
        params=params,
        deadline_ms=deadline_ms,
        resumable=resumable,
    )


def _deadline(timeout_s: float) -> int:
    return int((time.time() + timeout_s) * 1000)


class _Seen:
    """Which replies are news: the newest attempt only, and each chunk of it once."""

    __slots__ = ("attempt", "seq")

    def __init__(self) -> None:
        self.attempt = 0
        self.seq = -1

    def fresh(self, reply: Reply) -> bool:
        if reply.attempt < self.attempt:
            return False
        if reply.attempt > self.attempt:
            self.attempt, self.seq = reply.attempt, -1
        if isinstance(reply, Chunk):
            if reply.seq <= self.seq:
                return False
            self.seq = reply.seq
        return True


if __name__ != "llm_pool_client":  # this folder imported by its old name (from a checkout): be the new package
    from llm_pool_contracts.old_names import stand_in

    stand_in(__name__)
