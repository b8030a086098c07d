"""Listens for cancellations (CONTRACT.md §5) on one pub/sub connection of the worker's own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from llm_pool_worker.backoff import Backoff, Stopped, describe, pause

log = structlog.get_logger(__name__)


class CancelListener:
    """Calls ``on_cancel(request_id)`` for each id published on the cancel channel.

    Pub/sub loses what is published while the connection is down; the cancel key of §5 covers
    jobs not yet started, and a running job then simply runs to its end.
    """

    def __init__(self, redis: aioredis.Redis, channel: str, on_cancel: Callable[[str], object]) -> None:
        self.redis = redis
        self.channel = channel
        self.on_cancel = on_cancel
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="cancel-listener")

    async def stop(self) -> None:
        self._stop.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        backoff = Backoff(first_s=0.2, cap_s=10.0)
        while True:
            try:
                await self._listen(backoff)
            except (RedisError, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("cancel channel lost; subscribing again", reason=describe(exc), retry_in_s=round(delay, 2))
            except Exception:
                delay = backoff.next_delay()
                log.exception("cancel listener failed; starting it again", retry_in_s=round(delay, 2))
            try:
                await pause(delay, self._stop)
            except Stopped:
                return

    async def _listen(self, backoff: Backoff) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            backoff.reset()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    data = message["data"]
                    self.on_cancel(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
