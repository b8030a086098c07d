"""One backoff for every wait on Redis, and one answer to "is Redis away?".

Every loop that waits for Redis (start-up, reads, outcome writes, the heartbeat, the cancel
listener) backs off the same way and gives way to a stop at once, so that SIGTERM ends a worker
whose Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Redis did not answer: the command may or may not have run. Anything else Redis says is an answer.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class Stopped(Exception):
    """A stop was asked for while waiting on Redis."""


class Backoff:
    """Delays that double from ``first_s`` up to ``cap_s``, each jittered by ±25 %."""

    __slots__ = ("cap_s", "failures", "first_s")

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.first_s * 2**self.failures)
        self.failures = min(self.failures + 1, 32)
        return jittered(delay)

    def reset(self) -> None:
        self.failures = 0


def jittered(seconds: float) -> float:
    """Spread periodic work, so that many workers do not act at the same moment."""
    return seconds * random.uniform(0.75, 1.25)


async def pause(seconds: float, stop: asyncio.Event) -> None:
    """Sleep, but end at once with :class:`Stopped` when ``stop`` is set."""
    if stop.is_set():
        raise Stopped
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
    raise Stopped


def describe(exc: BaseException) -> str:
    """The reason Redis gave, in one line. redis-py's messages name host and port, never a password."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def until_redis(step: Callable[[], Awaitable[T]], stop: asyncio.Event, what: str, target: str) -> T:
    """Run ``step`` until Redis answers, backing off; raises :class:`Stopped` on a stop."""
    backoff = Backoff()
    while True:
        try:
            return await step()
        except REDIS_DOWN as exc:
            delay = backoff.next_delay()
            log.warning("redis unavailable, retrying", during=what, redis=target, reason=describe(exc),
                        retry_in_s=round(delay, 2))
            await pause(delay, stop)
