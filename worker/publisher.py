"""The one writer of replies: a task that sends chunks and outcomes in pipelined round trips.

Chunks of all jobs that arrive while a round trip is in flight go out together in the next one,
and the texts of one job that piled up meanwhile are joined into one chunk: under load this
coalesces on its own, and at low load the first token leaves at once. Chunks are at-most-once
(pub/sub); ``done.content`` is the authoritative text.

Outcomes go out through the finisher's script, in the same pipeline and after the job's last
chunk, so that the terminal message follows every chunk. Each outcome is retried on its own,
with backoff, until Redis takes it or the worker stops: one that Redis refuses (out of memory,
read-only replica, a missing permission) holds up no other, and the refusal is logged loudly
and shown in the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoScriptError

from llm_pool_contracts import CHUNK_LOG_MAX, Chunk, Keys, encode
from llm_pool_worker.backoff import REDIS_DOWN, Backoff, describe
from llm_pool_worker.finisher import FINISH_SCRIPT, Finish, Outcome

log = structlog.get_logger(__name__)

REFUSAL_REPORT_S = 10.0  # while Redis refuses outcomes, say so at ERROR this often


class ReplyStream:
    """The replies of one attempt of one job."""

    __slots__ = ("_notify", "_pending", "attempt", "channel", "log", "log_fresh", "request_id", "seq")

    def __init__(self, request_id: str, attempt: int, channel: str, notify: Callable[[ReplyStream], None],
                 log: str = "") -> None:
        self.request_id = request_id
        self.attempt = attempt
        self.channel = channel
        self.log = log  # a resumable job's reply stream: every chunk is also kept there
        self.log_fresh = True  # its expiry is not set yet
        self.seq = 0
        self._pending: list[str] = []
        self._notify = notify

    def send_text(self, text: str) -> bool:
        """Queue a piece of streamed text; it leaves with the next round trip.

        Returns True when it starts a new batch: the caller should then let the event loop run,
        so that the batch leaves at once instead of after the whole stream was read.
        """
        if not text:
            return False
        self._pending.append(text)
        if len(self._pending) == 1:
            self._notify(self)
            return True
        return False

    def take_chunk(self) -> bytes | None:
        """The text queued so far as one chunk message, or None."""
        if not self._pending:
            return None
        text = self._pending[0] if len(self._pending) == 1 else "".join(self._pending)
        self._pending.clear()
        chunk = Chunk(request_id=self.request_id, attempt=self.attempt, seq=self.seq, text=text)
        self.seq += 1
        return encode(chunk)


@dataclass(slots=True, eq=False)
class _Unwritten:
    """An outcome on its way to Redis."""

    outcome: Outcome
    reply: ReplyStream | None
    done: asyncio.Future[Finish]
    payload: bytes | None = None  # encoded once, when first sent
    due_at: float = 0.0
    refused_at: float | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(first_s=0.05, cap_s=5.0))


class Publisher:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, result_ttl_s: int, window_s: float = 0.0,
        dead_bounds: tuple[int, int] = (10_000, 30 * 86_400),
    ) -> None:
        self.redis = redis
        self.dead_bounds = dead_bounds
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.window_s = window_s
        self._script = redis.register_script(FINISH_SCRIPT)
        self._dirty: list[ReplyStream] = []
        self._unwritten: list[_Unwritten] = []
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._refused_since: float | None = None
        self._reported_at = 0.0
        self.on_redis_error: Callable[[str], None] = lambda during: None

    # ---- what the runner uses -----------------------------------------------------------------

    def stream(self, request_id: str, attempt: int, resumable: bool = False) -> ReplyStream:
        log = self.keys.chunks(request_id) if resumable else ""
        return ReplyStream(request_id, attempt, self.keys.reply(request_id), self._mark, log)

    async def finish(self, outcome: Outcome, reply: ReplyStream | None) -> Finish:
        """Store, publish, dead-letter and acknowledge ``outcome`` after the chunks of ``reply``;
        returns what became of it once Redis has answered, or ABANDONED if the worker stopped first."""
        loop = asyncio.get_running_loop()
        item = _Unwritten(outcome, reply, loop.create_future(), due_at=loop.time())
        self._unwritten.append(item)
        self._wake.set()
        return await asyncio.shield(item.done)

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    @property
    def refused_since(self) -> float | None:
        """Wall-clock time since when Redis has refused every outcome it was sent, if it does."""
        return self._refused_since

    # ---- life ------------------------------------------------------------------------------------

    def _mark(self, reply: ReplyStream) -> None:
        self._dirty.append(reply)
        self._wake.set()

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="publisher")

    async def close(self, timeout_s: float) -> None:
        """Send what is queued, then stop. If Redis stays away that long, give up: the entries of
        unwritten outcomes are still unacknowledged, so another worker answers them."""
        if self.task is None:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while (self._dirty or self._unwritten) and loop.time() < give_up and not self.task.done():
            self._wake.set()
            await asyncio.sleep(0.01)
        if self._unwritten:
            log.warning("redis did not take every outcome before exit; their jobs stay pending for other workers",
                        count=len(self._unwritten))
        for item in self._unwritten:
            if not item.done.done():
                item.done.set_result(Finish.ABANDONED)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._sleep_until_work(loop)
            if self.window_s:
                await asyncio.sleep(self.window_s)  # let more tokens join this batch
            self._wake.clear()
            dirty, self._dirty = self._dirty, []
            now = loop.time()
            due = [item for item in self._unwritten if item.due_at <= now]
            try:
                await self._send(dirty, due)
            except Exception:  # a bug here must not leave every later outcome unwritten
                log.exception("publisher round failed; its outcomes will be sent again")
                for item in due:
                    self._later(item, loop.time())

    async def _sleep_until_work(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake.is_set():
            return
        waits = [item.due_at for item in self._unwritten]
        timeout = max(0.0, min(waits) - loop.time()) if waits else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    # ---- one round trip --------------------------------------------------------------------------

    async def _send(self, dirty: list[ReplyStream], due: list[_Unwritten]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for reply in dirty:
            chunk = reply.take_chunk()
            if chunk is not None:
                if reply.log:  # kept before it is published, so that a reader who saw it live finds it kept
                    pipe.xadd(reply.log, {"m": chunk}, maxlen=CHUNK_LOG_MAX, approximate=True)
                    if reply.log_fresh:
                        pipe.expire(reply.log, self.result_ttl_s)
                        reply.log_fresh = False
                pipe.publish(reply.channel, chunk)
        positions = [self._queue(pipe, item) for item in due]
        if not pipe.command_stack:
            return
        try:
            results = await pipe.execute(raise_on_error=False)
        except REDIS_DOWN as exc:
            self.on_redis_error("publish")
            now = asyncio.get_running_loop().time()
            if due:
                log.warning("redis unavailable; outcomes not yet written", count=len(due), reason=describe(exc))
            for item in due:
                self._later(item, now)
            return
        for item, position in zip(due, positions, strict=True):
            await self._settle(item, results[position])

    def _queue(self, pipe: Any, item: _Unwritten) -> int:
        """Add the outcome's last chunk (once) and its finish script; returns the script's position."""
        if item.payload is None:
            chunk = item.reply.take_chunk() if item.reply is not None else None
            if chunk is not None and item.reply is not None:
                pipe.publish(item.reply.channel, chunk)
            item.payload = item.outcome.payload(item.reply.seq if item.reply is not None else 0)
        outcome = item.outcome
        result_key = self.keys.result(outcome.request_id) if outcome.request_id else self.keys.dead
        channel = self.keys.reply(outcome.request_id) if outcome.request_id else ""
        args = outcome.script_args(channel, self.result_ttl_s, item.payload, self.dead_bounds)
        none = outcome.ack.stream  # a key not needed is named as the jobs stream (see FINISH_SCRIPT)
        ledger = outcome.ledger.key if outcome.ledger is not None else none
        pipe.evalsha(self._script.sha, 6, outcome.ack.stream, result_key, self.keys.dead, ledger, outcome.ack.running or none,
                     outcome.log or none, *args)
        return len(pipe.command_stack) - 1

    async def _settle(self, item: _Unwritten, result: Any) -> None:
        now = asyncio.get_running_loop().time()
        if isinstance(result, NoScriptError):  # Redis restarted, or its script cache was flushed
            await self.redis.script_load(FINISH_SCRIPT)
            item.due_at = now
            self._wake.set()
        elif isinstance(result, Exception):
            self._refused(item, result, now)
        else:
            self._refused_since = None
            self._unwritten.remove(item)
            if not item.done.done():
                item.done.set_result(Finish(result.decode() if isinstance(result, bytes) else str(result)))

    def _refused(self, item: _Unwritten, exc: Exception, now: float) -> None:
        self.on_redis_error("store outcome")
        if item.refused_at is None:
            item.refused_at = now
            log.error("redis refused to store an outcome; the job stays pending and is retried",
                      request_id=item.outcome.request_id, reason=describe(exc))
        if self._refused_since is None:
            self._refused_since = time.time()
        if now - self._reported_at >= REFUSAL_REPORT_S:
            self._reported_at = now
            log.error("redis refuses outcomes; not taking new jobs until it takes them", unwritten=len(self._unwritten),
                      refused_for_s=round(time.time() - self._refused_since, 1), reason=describe(exc))
        self._later(item, now)

    def _later(self, item: _Unwritten, now: float) -> None:
        item.due_at = now + item.backoff.next_delay()  # the loop's sleep ends at the earliest due time
