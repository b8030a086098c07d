"""The one reader of the job stream: new entries, entries lost in transit, dead workers' entries.

All three kinds take slots from one count: an entry holds a slot from the moment it is handed out
until its runner releases it, so a process never runs more jobs than its concurrency, and an entry
it already holds is never handed out again. Reads, checks of its own pending list and claims run
one after another in one loop, so that no two of them can see the same entry in flight.

The check of its own pending list also tells a worker when it has lost a job: an entry it holds
that another consumer now owns (the worker was paused, or cut off from Redis, past its lease) is
reported through ``on_lost``, and its runner stops without a word (CONTRACT.md §2, attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from llm_pool_contracts import Keys
from llm_pool_worker.backoff import REDIS_DOWN, Backoff, Stopped, describe, jittered, pause, until_redis
from llm_pool_worker.connections import backlog, ensure_group, group_gone
from llm_pool_worker.lanes import Lane, Slots
from llm_pool_worker.recovery import Reclaimer

log = structlog.get_logger(__name__)

StreamResponse = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


class Owner(enum.Enum):
    """Who owns an entry, by Redis's pending list."""

    THIS_WORKER = "this worker"  # also when Redis cannot tell: the finisher fences the outcome anyway
    ANOTHER = "another worker"
    NOBODY = "nobody"  # acknowledged (answered elsewhere), or the stream or group was deleted


@dataclass(frozen=True, slots=True)
class Ack:
    """What acknowledging one entry takes; the finisher's script uses it, nothing else acks."""

    stream: str
    group: str
    consumer: str
    entry_id: bytes
    running: str = ""  # the tenant's set of running jobs, for a job taken from the waiting room


@dataclass(slots=True, eq=False)
class Delivery:
    """A stream entry handed to this worker; it holds a slot until :meth:`release`."""

    ack: Ack
    fields: dict[bytes, bytes]
    deliveries: int  # this delivery included
    release: Callable[[], None]
    owner: Callable[[], Awaitable[Owner]]  # asks the pending entry who owns it now
    finishing: bool = field(default=False)  # its outcome went to the finisher, which fences it itself
    lane: Lane = Lane.INTERACTIVE

    @property
    def entry_id(self) -> bytes:
        return self.ack.entry_id


@dataclass(frozen=True, slots=True)
class InboxLimits:
    concurrency: int
    block_ms: int
    round_s: float  # how often it checks its own pending list and claims dead workers' entries
    stale_after_s: float  # an entry idle this long is claimed whoever holds it


class Inbox:
    def __init__(
        self,
        redis: aioredis.Redis,
        reader: aioredis.Redis,
        keys: Keys,
        consumer: str,
        limits: InboxLimits,
        stop: asyncio.Event,
        target: str,
        lane: Lane = Lane.INTERACTIVE,
        slots: Slots | None = None,
        stream: str | None = None,
    ) -> None:
        self.lane = lane
        self.stream = stream or lane.stream(keys)
        self.slots = slots or Slots(limits.concurrency, batch_share=0)
        self.redis = redis
        self.reader = reader
        self.keys = keys
        self.consumer = consumer
        self.limits = limits
        self.stop = stop
        self.target = target
        self.reclaimer = Reclaimer(redis, keys, consumer, limits.stale_after_s, self.stream)
        self.on_lost: Callable[[list[Delivery]], None] = lambda lost: None
        self.may_take: Callable[[], bool] = lambda: True  # False while Redis refuses to store outcomes
        self.on_redis_error: Callable[[str], None] = lambda during: None
        self.on_reclaimed: Callable[[int], None] = lambda count: None
        self._held: dict[bytes, Delivery] = {}
        self._room = self.slots.watch()
        self._check_now = True  # a read failed: it may have delivered entries that never reached us
        self._backoff = Backoff()

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def free(self) -> int:
        return self.slots.free_for(self.lane)

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        """Entries to run, in batches, until a stop; never more than the free slots."""
        loop = asyncio.get_running_loop()
        next_round = 0.0
        while not self.stop.is_set():
            try:
                if self._check_now or loop.time() >= next_round:
                    next_round = loop.time() + jittered(self.limits.round_s)
                    batch = await self._round()
                elif self._can_read():
                    batch = await self._read_new()
                else:
                    await self._wait_for_room(next_round - loop.time())
                    continue
            except Stopped:
                return
            except Exception:  # a bug in one round must not end the worker's reading
                log.exception("inbox round failed; going on")
                batch = []
                with contextlib.suppress(Stopped):
                    await pause(self._backoff.next_delay(), self.stop)
            if batch:
                yield batch

    # ---- the three sources -------------------------------------------------------------------

    def _can_read(self) -> bool:
        return self.free > 0 and self.may_take()

    READ_STEP = "read"  # what a failed read is called in logs and metrics

    async def _read_new(self) -> list[Delivery]:
        asked = self.free
        entries = await self._fetch(asked)
        got = [self._hand_out(entry_id, fields, 1) for entry_id, fields in entries]
        self.slots.saw(self.lane, asked, len(got))
        return got

    async def _fetch(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Up to ``count`` new entries; none when Redis failed, which it notes and backs off from."""
        try:
            entries = await self._new_entries(count)
        except ResponseError as exc:
            await self._on_group_error(exc)
            return []
        except REDIS_DOWN as exc:
            self._check_now = True  # a read whose reply was lost may have delivered entries
            await self._redis_down(self.READ_STEP, exc)
            return []
        self._backoff.reset()
        return entries

    async def _new_entries(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """New entries of the stream, blocking a while for them."""
        response = await self.reader.xreadgroup(
            self.keys.group, self.consumer, {self.stream: ">"}, count=count, block=self.limits.block_ms
        )
        return [entry for _stream, batch in cast(StreamResponse, response or []) for entry in batch]

    async def _round(self) -> list[Delivery]:
        """Check this consumer's own pending list, then claim dead workers' entries into free slots."""
        try:
            orphans = await self._check_own()
            self._check_now = False
            room = self.free if self.may_take() else 0
            claimed = await self.reclaimer.claim(room) if room > 0 else []
            if room == 0:  # it cannot read now: whether it has work waiting changes the other lane's share
                self.slots.set_waiting(self.lane, await backlog(self.redis, self.stream, self.keys.group) > 0)
        except ResponseError as exc:
            await self._on_group_error(exc)
            return []
        except REDIS_DOWN as exc:
            await self._redis_down("recovery round", exc)
            return []
        if claimed:
            self.on_reclaimed(len(claimed))
        return orphans + [self._hand_out(entry_id, fields, earlier + 1) for entry_id, fields, earlier in claimed]

    async def _check_own(self) -> list[Delivery]:
        """Entries pending for this consumer that it does not hold were delivered by a read whose
        reply was lost: hand them out (their delivery was counted already). Entries it holds that
        another consumer owns now were lost to it: report them."""
        limit = self.limits.concurrency + 1
        pending = cast(list[dict[str, Any]], await self.redis.xpending_range(
            self.stream, self.keys.group, "-", "+", limit, consumername=self.consumer
        ))
        mine: dict[bytes, int] = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        if len(pending) < limit:
            await self._report_lost([d for i, d in self._held.items() if i not in mine and not d.finishing])
        orphans = [(i, n) for i, n in mine.items() if i not in self._held][: self.free if self.may_take() else 0]
        if not orphans:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in orphans:
            pipe.xrange(self.stream, entry_id, entry_id)
        found = cast(list[list[tuple[bytes, dict[bytes, bytes]]]], await pipe.execute())
        for entry_id, _ in orphans:
            log.warning("resuming a job whose delivery was cut off", entry_id=entry_id.decode())
        # an entry deleted from the stream is handed out empty: it is answered as invalid and dead-lettered
        return [self._hand_out(i, rows[0][1] if rows else {}, n) for (i, n), rows in zip(orphans, found, strict=True)]

    async def _report_lost(self, candidates: list[Delivery]) -> None:
        if not candidates:
            return
        pipe = self.redis.pipeline(transaction=False)
        for delivery in candidates:
            pipe.xpending_range(self.stream, self.keys.group, delivery.entry_id, delivery.entry_id, 1)
        owners = cast(list[list[dict[str, Any]]], await pipe.execute())
        lost = [d for d, rows in zip(candidates, owners, strict=True) if rows and rows[0]["consumer"] != self.consumer.encode()]
        if lost:
            log.warning("jobs taken over by another worker; stopping them here", count=len(lost),
                        entry_ids=[d.entry_id.decode() for d in lost])
            self.on_lost(lost)

    # ---- slots ---------------------------------------------------------------------------------

    def _hand_out(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> Delivery:
        ack = Ack(self.stream, self.keys.group, self.consumer, entry_id, self._running_set(fields))
        delivery = Delivery(ack, fields or {}, deliveries, lambda: self._release(entry_id), lambda: self._owner(entry_id),
                            lane=self.lane)
        self._held[entry_id] = delivery
        self.slots.take(self.lane)
        return delivery

    def _running_set(self, fields: dict[bytes, bytes]) -> str:
        return ""

    def _release(self, entry_id: bytes) -> None:
        if self._held.pop(entry_id, None) is not None:
            self.slots.give_back(self.lane)

    async def _owner(self, entry_id: bytes) -> Owner:
        try:
            rows = cast(list[dict[str, Any]], await self.redis.xpending_range(
                self.stream, self.keys.group, entry_id, entry_id, 1
            ))
        except (*REDIS_DOWN, ResponseError):
            return Owner.THIS_WORKER
        if not rows:
            return Owner.NOBODY
        return Owner.THIS_WORKER if rows[0]["consumer"] == self.consumer.encode() else Owner.ANOTHER

    async def _wait_for_room(self, timeout_s: float) -> None:
        self._room.clear()
        stop = asyncio.ensure_future(self.stop.wait())
        room = asyncio.ensure_future(self._room.wait())
        await asyncio.wait({stop, room}, timeout=max(0.0, min(timeout_s, 1.0)), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        room.cancel()

    # ---- faults --------------------------------------------------------------------------------

    async def _redis_down(self, during: str, exc: BaseException) -> None:
        self.on_redis_error(during)
        delay = self._backoff.next_delay()
        log.warning("redis unavailable, retrying", during=during, redis=self.target, reason=describe(exc),
                    retry_in_s=round(delay, 2))
        await pause(delay, self.stop)

    async def _on_group_error(self, exc: ResponseError) -> None:
        if not group_gone(exc):  # an answer, but not one it can act on (a permission, a wrong type)
            delay = self._backoff.next_delay()
            log.error("redis refused a read of the job stream", reason=describe(exc), retry_in_s=round(delay, 2))
            await pause(delay, self.stop)
            return
        log.warning("job stream or consumer group missing; creating them again", reason=describe(exc))
        await until_redis(lambda: ensure_group(self.redis, self.keys), self.stop, "creating the group", self.target)
