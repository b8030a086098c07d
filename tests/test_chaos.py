"""Real worker processes killed, signalled, and cut off from Redis: every job still ends once."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_client import LLMClient
from llm_pool_contracts import Chunk, Done, Job, decode_reply
from tests.conftest import RedisServer, StandIn
from tests.helpers import Listener, in_flight, user, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timings and counts of an outage


async def test_kill_9_loses_no_job_and_bills_none_more_than_twice(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    count = 200
    workers = [spawn_worker(LLM_WORKER_CONCURRENCY="150"), spawn_worker(LLM_WORKER_CONCURRENCY="150")]
    for process in workers:
        await asyncio.to_thread(process.wait_ready)
    run = uuid.uuid4().hex[:8]
    jobs = [
        Job(request_id=f"chaos-{run}-{i}", tenant_id="t", model="openai",
            messages=user(f"chaos-{run}-{i}. #tokens=40 #slow=100"), stream=True)
        for i in range(count)
    ]
    async with Listener(redis, f"{prefix}:reply:*") as listener:
        for job in jobs:
            await client.enqueue(job)

        async def both_busy() -> bool:
            flights = await in_flight(redis, prefix)
            return len(flights) == 2 and min(flights.values()) > 0 and sum(flights.values()) == count

        await wait_until(both_busy, 25, "200 jobs in flight on both workers")
        workers[0].proc.kill()  # SIGKILL: no goodbye, its liveness key just expires
        await listener.until(lambda replies: sum(not isinstance(r, Chunk) for r in replies) >= count, timeout=60)
        await asyncio.sleep(1.0)  # a duplicate terminal would show up now
        await listener.until(lambda replies: True)
        replies = listener.replies

    by_request: dict[str, list[Any]] = defaultdict(list)
    for reply in replies:
        by_request[reply.request_id].append(reply)
    assert set(by_request) == {job.request_id for job in jobs}
    restarted = 0
    for request_id, messages in by_request.items():
        terminals = [m for m in messages if not isinstance(m, Chunk)]
        assert len(terminals) == 1, (request_id, terminals)
        [done] = terminals
        assert isinstance(done, Done), done
        assert done.attempt == max(m.attempt for m in messages), "the terminal belongs to the last attempt"
        chunks = [m for m in messages if isinstance(m, Chunk) and m.attempt == done.attempt]
        assert "".join(c.text for c in chunks) == done.content
        restarted += done.attempt > 1
    assert restarted > 0, "the killed worker had jobs in flight"
    calls: dict[str, int] = defaultdict(int)
    for call in standin.calls():
        if f"chaos-{run}-" in (call.get("text") or ""):
            calls[call["text"].split(".")[0]] += 1
    assert len(calls) == count and max(calls.values()) <= 2
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0
    assert await asyncio.to_thread(workers[1].stop) == 0


async def test_sigterm_finishes_in_flight_jobs_and_leaves_new_ones_to_others(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    first = spawn_worker()
    await asyncio.to_thread(first.wait_ready)
    run = uuid.uuid4().hex[:8]
    early = [Job(request_id=f"early-{run}-{i}", tenant_id="t", model="openai",
                 messages=user(f"early-{run}-{i}. #tokens=20 #slow=100"), stream=True) for i in range(5)]
    late = [Job(request_id=f"late-{run}-{i}", tenant_id="t", model="openai",
                messages=user(f"late-{run}-{i}. #tokens=3")) for i in range(3)]
    async with Listener(redis, f"{prefix}:reply:*") as listener:
        for job in early:
            await client.enqueue(job)
        await wait_until(lambda: _flights_at_least(redis, prefix, 5), 10, "five jobs in flight")
        first.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # it has stopped reading
        for job in late:
            await client.enqueue(job)
        assert await asyncio.to_thread(first.proc.wait, 20) == 0
        await listener.until(lambda r: sum(not isinstance(x, Chunk) for x in r) >= 5)
        terminals = [r for r in listener.replies if not isinstance(r, Chunk)]
        assert {t.request_id for t in terminals} == {j.request_id for j in early}
        assert all(isinstance(t, Done) and t.attempt == 1 for t in terminals)
        second = spawn_worker()
        await asyncio.to_thread(second.wait_ready)
        await listener.until(lambda r: sum(not isinstance(x, Chunk) for x in r) >= 8)
        assert await asyncio.to_thread(second.stop) == 0
    for job in early + late:
        assert len(standin.calls_with(job.request_id + ".")) == 1, "nothing ran twice"


async def _flights_at_least(redis: aioredis.Redis, prefix: str, n: int) -> bool:
    return sum((await in_flight(redis, prefix)).values()) >= n


async def test_second_sigterm_exits_at_once_and_the_jobs_move_on(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str
) -> None:
    first = spawn_worker(LLM_WORKER_SHUTDOWN_GRACE_S="60")
    await asyncio.to_thread(first.wait_ready)
    rid = "long-" + uuid.uuid4().hex[:8]
    async with Listener(redis, client.keys.reply(rid)) as listener:
        await client.enqueue(Job(request_id=rid, tenant_id="t", model="openai", messages=user("#tokens=150 #slow=40"), stream=True))
        await listener.until(lambda r: len(r) >= 2)
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.proc.wait, 10) == 0
        assert time.monotonic() - started < 4, "the 60 s grace period was cut short"
        assert [k async for k in redis.scan_iter(f"{prefix}:worker:*")] == [], "it removed its liveness key"
        second = spawn_worker()
        await asyncio.to_thread(second.wait_ready)
        await listener.until(lambda r: any(isinstance(x, Done) for x in r), timeout=40)
        assert await asyncio.to_thread(second.stop) == 0
    [done] = [r for r in listener.replies if isinstance(r, Done)]
    assert done.attempt > 1 and done.usage.completion_tokens == 150


async def test_redis_restart_mid_run_loses_no_job(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    run = uuid.uuid4().hex[:8]
    before = [Job(request_id=f"before-{run}-{i}", tenant_id="t", model="openai",
                  messages=user(f"b{i} #tokens=5 #slow=200"), stream=i % 2 == 0) for i in range(20)]
    after = [Job(request_id=f"after-{run}-{i}", tenant_id="t", model="ollama", messages=user(f"a{i}")) for i in range(20)]
    for job in before:
        await client.enqueue(job)
    await asyncio.sleep(0.3)  # the worker has read them and is generating
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(4.0)
    await asyncio.to_thread(redis_server.start)
    for job in after:
        for _ in range(50):
            try:
                await client.enqueue(job)
                break
            except (ConnectionError, OSError, aioredis.ConnectionError):
                await asyncio.sleep(0.1)

    async def all_answered() -> bool:
        try:
            values = await redis.mget([client.keys.result(j.request_id) for j in before + after])
        except (aioredis.ConnectionError, OSError):
            return False
        return all(v is not None for v in values)

    await wait_until(all_answered, 60, "every job's outcome")
    outcomes = [decode_reply(v) for v in await redis.mget([client.keys.result(j.request_id) for j in before + after])]
    assert all(not hasattr(o, "code") for o in outcomes), [o for o in outcomes if hasattr(o, "code")]
    assert await asyncio.to_thread(process.stop) == 0
    lines = process.log_lines()
    assert [line for line in lines if "redis unavailable" in line.get("event", "")], "the outage was logged"
    resubscribes = [line for line in lines if line.get("event", "").startswith("cancel channel lost")]
    assert 1 <= len(resubscribes) <= 6, "the cancel listener backs off (every 0.5 s would be 8 in 4 s)"


async def test_client_gets_its_answer_across_a_redis_restart(
    worker: Any, client: LLMClient, redis_server: RedisServer
) -> None:
    answer = asyncio.create_task(client.complete("openai", user("#tokens=10 #slow=200"), tenant_id="t", timeout=60))
    await asyncio.sleep(0.5)  # the job is generating
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(redis_server.start)
    result = await answer
    assert result.usage.completion_tokens == 10 and result.content == " ".join(f"t{i}" for i in range(10))
