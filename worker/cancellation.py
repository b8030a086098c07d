"""Listens for cancellations (CONTRACT.md §5) on one pub/sub connection of the worker's own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

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
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cancel-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        data = message["data"]
                        self.on_cancel(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                log.warning("cancel channel lost; subscribing again", error=type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
