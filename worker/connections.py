"""Redis clients of a worker process, and the consumer group they read."""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from llm_pool_contracts import LANES, Keys
from llm_pool_worker.settings import Settings

#: What Redis says when the group or its stream is gone (an operator's DEL, a flush, a restart without
#: persistence). Readers create both again and carry on.
GROUP_GONE = ("NOGROUP", "UNBLOCKED")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def redis_target(settings: Settings) -> str:
    """``host:port/db`` of the Redis URL, for log lines: never its user or password."""
    parts = urlsplit(settings.redis_url.get_secret_value())
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.scheme}://{host}:{port}{parts.path or ''}"


def connect(settings: Settings, *, max_connections: int | None = None, reader: bool = False) -> aioredis.Redis:
    """A client. The ``reader`` (blocking reads) gets a connection of its own and no automatic
    retry: a read whose reply was lost must be seen as lost, because it may have delivered entries."""
    options: dict[str, object] = {}
    if reader:
        options = {"single_connection_client": True, "retry": Retry(NoBackoff(), 0)}
    return aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=5,
        max_connections=max_connections,
        **options,  # type: ignore[arg-type]
    )


def group_gone(exc: ResponseError) -> bool:
    return str(exc).startswith(GROUP_GONE)


async def ensure_group(redis: aioredis.Redis, keys: Keys) -> None:
    """Create each lane's stream and group if missing. A group starts at 0: entries added before
    it existed, or left when it was deleted, are jobs that nobody has answered yet."""
    for stream in (*keys.lanes(), *(keys.run(lane) for lane in LANES)):
        try:
            await redis.xgroup_create(stream, keys.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


async def backlog(redis: aioredis.Redis, stream: str, group: str) -> int:
    """Entries of ``stream`` not yet delivered to any consumer. Answered entries are deleted, so
    where Redis cannot tell the group's lag, the stream's length less its pending entries is it."""
    try:
        found = await _group(redis, stream, group)
    except ResponseError:
        return 0  # no stream yet
    if not found:
        return 0
    if found.get("lag") is not None:
        return int(found["lag"])
    return max(0, int(await redis.xlen(stream)) - int(found.get("pending") or 0))


async def _group(redis: aioredis.Redis, stream: str, name: str) -> dict[str, Any]:
    """The group's entry of XINFO GROUPS (empty when the stream has no such group)."""
    groups = await redis.xinfo_groups(stream)
    return next((g for g in groups if g.get("name") in (name, name.encode())), {})


async def group_figures(redis: aioredis.Redis, stream: str, group_name: str) -> tuple[int | None, int, float | None]:
    """A lane's lag (entries not yet delivered; None before Redis 7), its pending entries, and
    the age in seconds of the oldest one (None when none is pending)."""
    lag = (await _group(redis, stream, group_name)).get("lag")
    summary = await redis.xpending(stream, group_name)
    oldest = summary.get("min")
    age = time.time() - int(oldest.split(b"-")[0]) / 1000 if isinstance(oldest, bytes) else None
    return (int(lag) if lag is not None else None), int(summary["pending"]), age
