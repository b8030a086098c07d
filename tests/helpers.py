"""Small helpers the test modules share: messages, markers, a reply listener, waits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis

from llm_pool_client import LLMClient
from llm_pool_contracts import Chunk, Job, decode_heartbeat, decode_reply, encode


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


class Listener:
    """Subscribes to reply channels before the test causes replies, and collects them."""

    def __init__(self, redis: aioredis.Redis, pattern: str) -> None:
        self.pubsub = redis.pubsub()
        self.pattern = pattern
        self.replies: list[Any] = []

    async def __aenter__(self) -> Listener:
        await self.pubsub.psubscribe(self.pattern)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def until(self, done: Any, timeout: float = 20.0) -> list[Any]:
        end = time.monotonic() + timeout
        while not done(self.replies):
            if time.monotonic() > end:
                raise AssertionError(f"gave up waiting; got {self.replies}")
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                self.replies.append(decode_reply(message["data"]))
        return self.replies

    def terminals(self) -> list[Any]:
        return [r for r in self.replies if not isinstance(r, Chunk)]

    def by_request(self) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = defaultdict(list)
        for reply in self.replies:
            grouped[reply.request_id].append(reply)
        return grouped


async def ghost_takes(redis: aioredis.Redis, client: LLMClient, job: Job | bytes, ghost: str = "ghost-1-dead") -> bytes:
    """Enqueue a job and have it read by a consumer that has no liveness key: a dead worker."""
    raw = job if isinstance(job, bytes) else encode(job)
    entry_id: bytes = await redis.xadd(client.keys.jobs, {"job": raw})
    await redis.xreadgroup(client.keys.group, ghost, {client.keys.jobs: ">"})
    return entry_id


async def in_flight(redis: aioredis.Redis, prefix: str) -> dict[str, int]:
    counts = {}
    async for key in redis.scan_iter(f"{prefix}:worker:*"):
        raw = await redis.get(key)
        if raw is not None:
            beat = decode_heartbeat(raw)
            counts[beat.consumer] = beat.in_flight
    return counts


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def most_open_at_once(calls: list[dict[str, Any]]) -> int:
    """The most provider calls that were open at the same moment, from the stand-in's call log."""
    edges = sorted([(c["at"], 1) for c in calls] + [(c.get("ended", float("inf")), -1) for c in calls])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def until_stored(client: LLMClient, request_id: str, timeout: float = 20.0) -> None:
    """Wait for a job's stored outcome (CONTRACT.md §3)."""
    end = time.monotonic() + timeout
    while True:
        try:
            if await client.stored_outcome(request_id) is not None:
                return
        except (aioredis.ConnectionError, OSError):
            pass  # Redis restarting: ask again
        if time.monotonic() > end:
            raise AssertionError(f"{request_id} never answered")
        await asyncio.sleep(0.05)
