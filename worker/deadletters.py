"""The dead-letter stream ``{p}:jobs:dead`` for operators: list, show, replay, purge (CONTRACT.md §4).

A replay does what its name says: the job runs again, from scratch. Its stored outcome and its
cancel key are removed and the job is added to the job stream as a new entry (so its delivery
count starts over), in one transaction, and the dead letter goes. A job that is still invalid, or
that was kept only in part (over the size limit), is refused with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from llm_pool_contracts import InvalidJob, Keys, decode_job, readable_request_id


@dataclass(frozen=True, slots=True)
class DeadEntry:
    id: str
    fields: dict[str, bytes]

    def text(self, name: str) -> str:
        return self.fields.get(name, b"").decode(errors="replace")

    @property
    def request_id(self) -> str:
        job = self.fields.get("job")
        return (readable_request_id(job) or "?") if job is not None else "?"

    def summary(self) -> dict[str, str]:
        failed = int(self.text("failed_at_ms") or 0) / 1000
        return {"id": self.id, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failed)), "code": self.text("code"),
                "attempts": self.text("attempts"), "request_id": self.request_id, "message": self.text("message")[:120]}


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadEntry:
    return DeadEntry(entry_id.decode(), {k.decode(): v for k, v in fields.items()})


async def list_dead(redis: aioredis.Redis, keys: Keys, code: str | None = None, limit: int = 100) -> list[DeadEntry]:
    """The newest dead letters first."""
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(keys.dead, count=limit if code is None else None))
    entries = [_entry(i, f) for i, f in rows]
    return [e for e in entries if code is None or e.text("code") == code][:limit]


async def show_dead(redis: aioredis.Redis, keys: Keys, entry_id: str) -> DeadEntry | None:
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.dead, entry_id, entry_id))
    return _entry(*rows[0]) if rows else None


async def replay(redis: aioredis.Redis, keys: Keys, entry: DeadEntry, max_job_bytes: int) -> str:
    """Run the job again; returns its new entry id, or raises :class:`InvalidJob` with why not."""
    raw = entry.fields.get("job")
    if raw is None or entry.fields.get("job_truncated"):
        raise InvalidJob("only part of the job was kept (it was over the size limit)" if raw else "the dead letter has no job")
    job = decode_job(raw, max_job_bytes)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.result(job.request_id), keys.cancel_flag(job.request_id))
    pipe.xadd(keys.batch if entry.text("lane") == "batch" else keys.jobs, {"job": raw})
    pipe.xdel(keys.dead, entry.id)
    new_id = (await pipe.execute())[1]
    return new_id.decode() if isinstance(new_id, bytes) else str(new_id)


async def purge(redis: aioredis.Redis, keys: Keys, older_than_days: float | None) -> int:
    """Remove dead letters (all, or those older than the given days); returns how many."""
    if older_than_days is None:
        count = int(await redis.xlen(keys.dead))
        await redis.delete(keys.dead)
        return count
    cutoff = f"{int((time.time() - older_than_days * 86_400) * 1000)}-0"
    return int(await redis.xtrim(keys.dead, minid=cutoff))
