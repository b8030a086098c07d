"""Sends reply messages to Redis: one writer task, one pipelined round trip per batch.

Chunks of all jobs that arrive while a round trip is in flight go out together in the next
one, and the texts of one job that piled up meanwhile are joined into one chunk: under load
this coalesces on its own, and at low load the first token leaves at once. An outcome is
stored before it is published, and acknowledged after both, in one pipeline (CONTRACT.md §3-4).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from contracts import Chunk, Done, Keys, Terminal, encode

log = structlog.get_logger(__name__)

RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(slots=True)
class DeadLetter:
    """An entry of ``{p}:jobs:dead`` (CONTRACT.md §4)."""

    job: bytes | None
    code: str
    message: str
    attempts: int
    consumer: str

    def fields(self) -> dict[FieldT, EncodableT]:
        out: dict[FieldT, EncodableT] = {
            "code": self.code,
            "message": self.message,
            "attempts": self.attempts,
            "consumer": self.consumer,
            "failed_at_ms": int(time.time() * 1000),
        }
        if self.job is not None:
            out["job"] = self.job
        return out


@dataclass(slots=True)
class _Outcome:
    reply: ReplyChannel | None
    message: Terminal | bytes | None
    ack: str | bytes | None
    dead: DeadLetter | None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ReplyChannel:
    """The replies of one attempt of one job."""

    __slots__ = ("_pending", "_publisher", "attempt", "channel", "request_id", "result_key", "seq")

    def __init__(self, publisher: Publisher, request_id: str, attempt: int) -> None:
        self._publisher = publisher
        self.request_id = request_id
        self.attempt = attempt
        self.channel = publisher.keys.reply(request_id)
        self.result_key = publisher.keys.result(request_id)
        self.seq = 0
        self._pending: list[str] = []

    def send_text(self, text: str) -> bool:
        """Queue a piece of streamed text; it leaves with the next round trip.

        Returns True when it starts a new batch: the caller should then let the event loop run,
        so that the batch leaves at once instead of after the whole stream was read.
        """
        if not text:
            return False
        self._pending.append(text)
        if len(self._pending) == 1:
            self._publisher._mark(self)
            return True
        return False

    def _take_chunk(self) -> bytes | None:
        if not self._pending:
            return None
        text = self._pending[0] if len(self._pending) == 1 else "".join(self._pending)
        self._pending.clear()
        chunk = Chunk(request_id=self.request_id, attempt=self.attempt, seq=self.seq, text=text)
        self.seq += 1
        return encode(chunk)

    async def finish(self, message: Terminal, ack: str | bytes | None, dead: DeadLetter | None = None) -> None:
        """Store, publish, then acknowledge the terminal message, after every queued chunk."""
        await self._publisher.outcome(self, message, ack, dead)


class Publisher:
    """The one writer of replies of a worker process."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, result_ttl_s: int, window_s: float = 0.0) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.window_s = window_s
        self._dirty: list[ReplyChannel] = []
        self._outcomes: list[_Outcome] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def channel(self, request_id: str, attempt: int) -> ReplyChannel:
        return ReplyChannel(self, request_id, attempt)

    def _mark(self, reply: ReplyChannel) -> None:
        self._dirty.append(reply)
        self._wake.set()

    async def outcome(
        self,
        reply: ReplyChannel | None,
        message: Terminal | bytes | None,
        ack: str | bytes | None,
        dead: DeadLetter | None = None,
    ) -> None:
        """Store and publish ``message`` (a struct, or a stored payload sent again unchanged),
        dead-letter and acknowledge; returns once Redis has all of it."""
        item = _Outcome(reply, message, ack, dead)
        self._outcomes.append(item)
        self._wake.set()
        await asyncio.shield(item.done)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def close(self, timeout_s: float) -> None:
        """Send what is queued, then stop. If Redis stays away that long, give up: the entries of
        unwritten outcomes are still unacknowledged, so another worker answers them."""
        if self._task is None:
            return
        give_up = asyncio.get_running_loop().time() + timeout_s
        while (self._dirty or self._outcomes) and asyncio.get_running_loop().time() < give_up:
            self._wake.set()
            await asyncio.sleep(0.01)
        if self._outcomes:
            log.warning("redis still unavailable at exit; outcomes left unwritten", count=len(self._outcomes))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.window_s:
                await asyncio.sleep(self.window_s)  # let more tokens join this batch
            self._wake.clear()
            dirty, self._dirty = self._dirty, []
            outcomes, self._outcomes = self._outcomes, []
            try:
                await self._send(dirty, outcomes)
            except Exception:  # a bug here must not leave every later outcome unwritten
                log.exception("publisher round failed; retrying its outcomes")
                self._requeue(outcomes)
                await asyncio.sleep(1.0)

    def _encode_outcome(self, item: _Outcome) -> bytes | None:
        message = item.message
        if message is None or isinstance(message, bytes):
            return message
        if isinstance(message, Done) and item.reply is not None:
            message = msgspec.structs.replace(message, seq=item.reply.seq)
        return encode(message)

    async def _send(self, dirty: list[ReplyChannel], outcomes: list[_Outcome]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for reply in dirty:
            payload = reply._take_chunk()
            if payload is not None:
                pipe.publish(reply.channel, payload)
        for item in outcomes:
            if item.reply is not None:
                chunk = item.reply._take_chunk()  # text queued after the last round trip
                if chunk is not None:
                    pipe.publish(item.reply.channel, chunk)
            self._queue_outcome(pipe, item)
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            if delay:
                await asyncio.sleep(delay)
            try:
                results = await pipe.execute(raise_on_error=False)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis unavailable, outcome not yet written", error=type(exc).__name__, try_=attempt + 1)
                if not outcomes:
                    return  # chunks are at-most-once; a lost subscriber connection loses them anyway
                pipe = self.redis.pipeline(transaction=False)
                for item in outcomes:
                    self._queue_outcome(pipe, item)
        else:
            self._requeue(outcomes)
            return
        for result in results:
            if isinstance(result, Exception):
                log.error("redis refused a reply command", error=str(result))
        for item in outcomes:
            if not item.done.done():
                item.done.set_result(None)

    def _requeue(self, outcomes: list[_Outcome]) -> None:
        """Redis stayed away: keep the outcomes for the next round, the job stays unacknowledged."""
        self._outcomes[:0] = outcomes
        self._wake.set()

    def _queue_outcome(self, pipe: aioredis.client.Pipeline, item: _Outcome) -> None:
        payload = self._encode_outcome(item)
        if payload is not None and item.reply is not None:
            pipe.set(item.reply.result_key, payload, ex=self.result_ttl_s)
            pipe.publish(item.reply.channel, payload)
        if item.dead is not None:
            pipe.xadd(self.keys.dead, item.dead.fields())
        if item.ack is not None:
            pipe.xack(self.keys.jobs, self.keys.group, item.ack)
            pipe.xdel(self.keys.jobs, item.ack)  # acked: nobody needs it, and the stream stays short
