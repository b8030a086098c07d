"""The worker as a process and as a pool: liveness, sharing a stream, the client's promises."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_client import JobFailed, LLMClient, ReplyTimeout
from llm_pool_contracts import Chunk, Error, ErrorCode, Job, Result, decode_heartbeat, decode_reply, encode
from tests.helpers import user


async def worker_keys(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(f"{prefix}:worker:*")]


async def test_heartbeat_key_lives_while_running_and_goes_at_shutdown(
    worker: Any, redis: aioredis.Redis, prefix: str, client: LLMClient
) -> None:
    key = f"{prefix}:worker:{worker.worker.consumer}"
    beat = decode_heartbeat(await redis.get(key))
    assert beat.consumer == worker.worker.consumer and beat.pid > 0 and beat.version
    ttl_ms = await redis.pttl(key)
    assert 0 < ttl_ms <= 3 * 500
    await client.complete("openai", user("hi"), tenant_id="t", timeout=10)
    await asyncio.sleep(0.7)  # one refresh later
    later = decode_heartbeat(await redis.get(key))
    assert later.heartbeat_at_ms > beat.heartbeat_at_ms and later.completed == 1
    await worker.stop()
    assert await redis.exists(key) == 0


async def test_job_failures_are_counted_in_the_heartbeat(worker: Any, redis: aioredis.Redis, prefix: str, client: LLMClient) -> None:
    with pytest.raises(JobFailed):
        await client.complete("no-such-group", user("hi"), tenant_id="t", timeout=10)
    await worker.worker.heartbeat.beat()
    beat = decode_heartbeat(await redis.get(f"{prefix}:worker:{worker.worker.consumer}"))
    assert (beat.completed, beat.failed) == (0, 1)


@pytest.mark.slow
async def test_worker_process_announces_itself_and_exits_cleanly_on_sigterm(
    spawn_worker: Any, redis: aioredis.Redis, prefix: str, client: LLMClient
) -> None:
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    [key] = await worker_keys(redis, prefix)
    beat = decode_heartbeat(await redis.get(key))
    assert beat.pid == process.proc.pid
    result = await client.complete("ollama", user("from a process"), tenant_id="t", timeout=20)
    assert result.content == "from a process"
    assert await asyncio.to_thread(process.stop, signal.SIGTERM) == 0
    assert await worker_keys(redis, prefix) == []
    lines = process.log_lines()
    assert lines and all("event" in line for line in lines), "logs are JSON lines when not on a terminal"
    done = [line for line in lines if line["event"] == "job done"]
    assert done[0]["request_id"] == result.request_id and done[0]["tenant_id"] == "t"
    assert "from a process" not in process.log_path.read_text(), "prompts are logged only at debug level"


@pytest.mark.slow
async def test_two_worker_processes_share_the_stream_and_answer_each_job_once(
    spawn_worker: Any, redis: aioredis.Redis, prefix: str, client: LLMClient
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    for process in workers:
        await asyncio.to_thread(process.wait_ready)
    count = 60
    jobs = [
        Job(request_id=f"share-{i}", tenant_id="t", model="openai", messages=user(f"job {i} #slow=5"), stream=i % 2 == 0)
        for i in range(count)
    ]
    pubsub = redis.pubsub()
    await pubsub.psubscribe(f"{prefix}:reply:*")
    for job in jobs:
        await client.enqueue(job)
    terminals: Counter[str] = Counter()
    end = time.monotonic() + 30
    while sum(terminals.values()) < count and time.monotonic() < end:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is not None:
            reply = decode_reply(message["data"])
            if not isinstance(reply, Chunk):
                assert not isinstance(reply, Error), reply
                terminals[reply.request_id] += 1
    await asyncio.sleep(0.5)  # a duplicate would arrive now
    while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)) is not None:
        reply = decode_reply(message["data"])
        if not isinstance(reply, Chunk):
            terminals[reply.request_id] += 1
    await pubsub.aclose()
    assert terminals == Counter({job.request_id: 1 for job in jobs})
    served = []
    for process in workers:
        assert await asyncio.to_thread(process.stop) == 0
        served.append(sum(1 for line in process.log_lines() if line["event"] == "job done"))
    assert sum(served) == count and min(served) > 0, served
    pending = await redis.xpending(client.keys.jobs, client.keys.group)
    assert pending["pending"] == 0


async def test_client_complete_and_stream_end_to_end(client: LLMClient, worker: Any) -> None:
    result = await client.complete("anthropic", user("hi there"), tenant_id="acme", request_id="e2e-1", timeout=10)
    assert isinstance(result, Result) and result.request_id == "e2e-1" and result.content == "hi there"
    events = [e async for e in client.stream("anthropic", user("a b c #slow=10"), tenant_id="acme", timeout=10)]
    assert all(isinstance(e, Chunk) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == events[-1].content == "a b c"  # type: ignore[union-attr]


async def test_client_raises_a_typed_error(client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete("broken", user("x"), tenant_id="acme", timeout=10)
    assert caught.value.code == ErrorCode.PROVIDERS_UNAVAILABLE
    assert isinstance(caught.value.error, Error)


async def test_client_times_out_when_no_worker_answers(client: LLMClient) -> None:
    started = time.monotonic()
    with pytest.raises(ReplyTimeout):
        await client.complete("openai", user("nobody home"), tenant_id="acme", timeout=0.5)
    assert time.monotonic() - started < 3


async def test_client_reads_the_stored_outcome_when_it_missed_the_reply(client: LLMClient, redis: aioredis.Redis) -> None:
    request_id = "missed-" + uuid.uuid4().hex
    stored = Error(request_id=request_id, attempt=1, code=ErrorCode.EXPIRED, message="the deadline passed")
    await redis.set(client.keys.result(request_id), encode(stored))
    with pytest.raises(JobFailed) as caught:
        await client.complete("openai", user("x"), tenant_id="acme", request_id=request_id, timeout=5)
    assert caught.value.error == stored


async def test_many_concurrent_requests_share_one_client(client: LLMClient, worker: Any) -> None:
    async def one(i: int) -> str:
        if i % 2:
            return (await client.complete("ollama", user(f"n{i}"), tenant_id="t", timeout=20)).content
        parts = [e async for e in client.stream("openai", user(f"n{i}"), tenant_id="t", timeout=20)]
        return parts[-1].content  # type: ignore[union-attr]

    answers = await asyncio.gather(*(one(i) for i in range(50)))
    assert answers == [f"n{i}" for i in range(50)]


async def test_worker_reads_no_more_than_its_free_slots(settings: Any, router: Any, client: LLMClient, redis: aioredis.Redis) -> None:
    from tests.conftest import RunningWorker

    async with RunningWorker(settings.model_copy(update={"concurrency": 2}), router):
        for i in range(6):
            await client.enqueue(Job(request_id=f"slot-{i}", tenant_id="t", model="openai", messages=user("wait #slow=300")))
        await asyncio.sleep(0.4)
        info = await redis.xinfo_consumers(client.keys.jobs, client.keys.group)
        assert [c["pending"] for c in info] == [2]

