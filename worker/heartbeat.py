"""Keeps the worker's liveness key alive (CONTRACT.md §6): its expiry is the worker's death notice.

When Redis refuses writes because it is out of memory, ``SET`` is refused but ``PEXPIRE`` is not:
the lease is then kept alive with ``PEXPIRE`` (its content stops changing, so ``heartbeat_at_ms``
falls behind), and the worker's jobs are not taken from it while it waits to store their outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from llm_pool_contracts import Heartbeat, encode
from llm_pool_worker.backoff import REDIS_DOWN, describe

log = structlog.get_logger(__name__)


class HeartbeatKeeper:
    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        interval_s: float,
        snapshot: Callable[[], Heartbeat],
    ) -> None:
        self.redis = redis
        self.key = key
        self.interval_s = interval_s
        self.ttl_ms = max(1, int(3 * interval_s * 1000))
        self.snapshot = snapshot
        self.task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        try:
            await self.redis.set(self.key, encode(self.snapshot()), px=self.ttl_ms)
        except ResponseError as exc:  # refused (out of memory, read-only): keep the lease at least
            kept = await self.redis.pexpire(self.key, self.ttl_ms)
            log.error("heartbeat refused by redis; lease kept without an update" if kept else
                      "heartbeat refused by redis; lease lost", reason=describe(exc))

    async def start(self) -> None:
        """Announce the worker before it reads a job, then keep announcing it."""
        await self.beat()
        self.task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove the key: whatever this worker left pending is free to reclaim."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        try:
            await self.redis.delete(self.key)
        except (RedisError, OSError) as exc:
            log.warning("could not remove the liveness key", reason=describe(exc))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except (*REDIS_DOWN, RedisError) as exc:
                log.warning("heartbeat not written", reason=describe(exc))
            except Exception:
                log.exception("heartbeat failed; trying again next interval")
