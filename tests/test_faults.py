"""Everyday faults at the process level, against a real redis-server: dropped connections, Redis
out of memory, a paused worker, a client that gives up, an unreachable Redis, a deleted stream.
Each test counts what a user would count: model calls per job, terminal messages per request,
entries left pending, outcomes stored."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_client import JobFailed, LLMClient, ReplyTimeout
from llm_pool_contracts import Chunk, Done, Error, ErrorCode, Job, decode_heartbeat, decode_reply
from scripts.localports import free_port
from tests.conftest import ROOT, StandIn, WorkerProcess, worker_env
from tests.helpers import Listener, ghost_takes, in_flight, marker, most_open_at_once, user, wait_until

pytestmark = pytest.mark.slow


async def started(spawn: Any, **env: str) -> WorkerProcess:
    process: WorkerProcess = spawn(**env)
    await asyncio.to_thread(process.wait_ready)
    return process


async def pending(redis: aioredis.Redis, client: LLMClient) -> int:
    return int((await redis.xpending(client.keys.jobs, client.keys.group))["pending"])


async def stored(redis: aioredis.Redis, client: LLMClient, jobs: list[Job]) -> list[Any]:
    values = await redis.mget([client.keys.result(j.request_id) for j in jobs])
    return [decode_reply(v) if v is not None else None for v in values]


def calls_per_job(standin: StandIn, tag: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in standin.calls_with(tag):
        name = call["text"].split(".")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def streamed_jobs(tag: str, count: int, directives: str, model: str = "openai") -> list[Job]:
    return [Job(request_id=f"{tag}-{i}", tenant_id="t", model=model, messages=user(f"{tag}-{i}. {directives}"), stream=True)
            for i in range(count)]


def assert_one_terminal_each(listener: Listener, jobs: list[Job]) -> None:
    by_request = listener.by_request()
    assert set(by_request) == {j.request_id for j in jobs}
    for request_id, messages in by_request.items():
        terminals = [m for m in messages if not isinstance(m, Chunk)]
        assert len(terminals) == 1, (request_id, terminals)
        assert terminals[0].attempt == max(m.attempt for m in messages), "the terminal belongs to the last attempt"


# ---- Redis connections dropped -------------------------------------------------------------------


async def test_dropped_connections_run_no_job_twice(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    """Every client connection is killed six times, 0.4 s apart, while 60 streams run 16 at a time."""
    await started(spawn_worker, LLM_WORKER_CONCURRENCY="16")
    tag = "drop-" + marker()
    jobs = streamed_jobs(tag, 60, "#tokens=6 #slow=50")
    async with Listener(redis, f"{prefix}:reply:*") as listener:
        for job in jobs:
            await client.enqueue(job)
        for _ in range(6):
            await asyncio.sleep(0.4)
            await redis.client_kill_filter(_type="normal", skipme=True)
        await listener.until(lambda r: sum(not isinstance(x, Chunk) for x in r) >= len(jobs), timeout=60)
        await asyncio.sleep(1.0)  # a second terminal would arrive now
        await listener.until(lambda r: True)
    assert_one_terminal_each(listener, jobs)
    assert all(isinstance(t, Done) for t in listener.terminals())
    calls = calls_per_job(standin, tag)
    assert len(calls) == len(jobs) and max(calls.values()) == 1, "no job reached the model twice"
    assert await pending(redis, client) == 0
    assert all(isinstance(o, Done) for o in await stored(redis, client, jobs))


# ---- Redis out of memory -------------------------------------------------------------------------


async def test_outcomes_refused_for_lack_of_memory_wait_and_are_stored_when_memory_is_freed(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    process = await started(spawn_worker)
    tag = "oom-" + marker()
    jobs = streamed_jobs(tag, 8, "#tokens=10 #slow=100")
    async with Listener(redis, f"{prefix}:reply:*") as listener:
        for job in jobs:
            await client.enqueue(job)
        await wait_until(lambda: _flights_at_least(redis, prefix, 8), 10, "eight jobs in flight")
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        try:
            await asyncio.sleep(3.5)  # every job finished generating about 2.5 s ago
            assert await stored(redis, client, jobs) == [None] * 8
            assert await pending(redis, client) == 8, "no entry was acknowledged without its stored outcome"
            beat_key = f"{prefix}:worker:{process_consumer(process)}"
            assert await redis.exists(beat_key), "the lease is kept (PEXPIRE) while Redis refuses writes"
        finally:
            await redis.config_set("maxmemory", 0)
        await wait_until(lambda: _all_stored(redis, client, jobs), 20, "every outcome stored")
        await listener.until(lambda r: sum(not isinstance(x, Chunk) for x in r) >= len(jobs))
        await asyncio.sleep(0.5)
        await listener.until(lambda r: True)
    assert_one_terminal_each(listener, jobs)
    assert await pending(redis, client) == 0
    assert max(calls_per_job(standin, tag).values()) == 1
    errors = [line for line in process.log_lines() if line.get("level") == "error"]
    assert any("refused to store an outcome" in line["event"] for line in errors), "the refusal was logged at ERROR"
    beat = decode_heartbeat(await redis.get(f"{prefix}:worker:{process_consumer(process)}"))
    assert beat.unwritten == 0 and beat.writes_refused_since_ms is None


def process_consumer(process: WorkerProcess) -> str:
    return next(line["consumer"] for line in process.log_lines() if line.get("event") == "worker ready")


async def _flights_at_least(redis: aioredis.Redis, prefix: str, n: int) -> bool:
    return sum((await in_flight(redis, prefix)).values()) >= n


async def _all_stored(redis: aioredis.Redis, client: LLMClient, jobs: list[Job]) -> bool:
    return all(o is not None for o in await stored(redis, client, jobs))


# ---- one slot count ------------------------------------------------------------------------------


async def test_claimed_and_new_jobs_share_one_slot_count(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, standin: StandIn
) -> None:
    """A dead worker left six jobs; six new ones arrive at the same time. Concurrency 4 holds."""
    tag = "slots-" + marker()
    old = streamed_jobs(tag + "-old", 6, "#tokens=5 #slow=100")
    for job in old:
        await ghost_takes(redis, client, job)
    new = streamed_jobs(tag + "-new", 6, "#tokens=5 #slow=100")
    process = spawn_worker(LLM_WORKER_CONCURRENCY="4")
    for job in new:
        await client.enqueue(job)
    await asyncio.to_thread(process.wait_ready)
    await wait_until(lambda: _all_stored(redis, client, old + new), 30, "every outcome stored")
    calls = standin.calls_with(tag)
    assert len(calls) == 12
    assert most_open_at_once(calls) <= 4, "never more provider calls open than the concurrency"


# ---- the current attempt -------------------------------------------------------------------------


async def test_a_cancel_after_a_restart_is_answered_in_the_current_attempt(
    spawn_worker: Any, client: LLMClient
) -> None:
    await started(spawn_worker)
    rid = "cancel-restart-" + marker()
    cancelled_at = 0.0
    with pytest.raises(JobFailed) as caught:
        async for event in client.stream("restarts", user("a b c d e f g h i j k l m n o p #slow=100"),
                                         tenant_id="t", request_id=rid, timeout=30):
            if event.attempt == 2 and not cancelled_at:
                cancelled_at = time.monotonic()
                await client.cancel(rid)
    assert cancelled_at, "the stream restarted"
    assert caught.value.code == ErrorCode.CANCELLED and caught.value.error.attempt == 2
    assert time.monotonic() - cancelled_at < 2, "the client heard the cancel at once, not at its timeout"
    outcome = await client.stored_outcome(rid)
    assert isinstance(outcome, Error) and outcome.attempt == 2


@pytest.mark.parametrize("pause_s", [3.0, 8.0], ids=["wakes-while-the-new-owner-runs", "wakes-after-it-answered"])
async def test_a_worker_paused_past_its_lease_does_not_answer(
    pause_s: float, spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    """SIGSTOP past the lease (heartbeat 0.5 s): another worker takes the job as a later attempt.
    The paused one, woken, must not publish, store or count a terminal message."""
    workers = [await started(spawn_worker), await started(spawn_worker)]
    rid = "paused-" + marker()
    job = Job(request_id=rid, tenant_id="t", model="openai", messages=user(f"{rid}. #tokens=40 #slow=100"), stream=True)
    async with Listener(redis, client.keys.reply(rid)) as listener:
        await client.enqueue(job)
        await listener.until(lambda r: len(r) >= 1)
        await wait_until(lambda: _flights_at_least(redis, prefix, 1), 5, "the job in a heartbeat")
        flights = await in_flight(redis, prefix)
        [busy] = [w for w in workers if flights.get(process_consumer(w))]
        os.kill(busy.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(pause_s)
        finally:
            os.kill(busy.proc.pid, signal.SIGCONT)
        await listener.until(lambda r: any(not isinstance(x, Chunk) for x in r), timeout=20)
        await asyncio.sleep(2.0)  # the woken worker's own ending would arrive now
        await listener.until(lambda r: True)
    [terminal] = listener.terminals()
    assert isinstance(terminal, Done) and terminal.attempt > 1
    assert terminal.attempt == max(r.attempt for r in listener.replies)
    outcome = await client.stored_outcome(rid)
    assert outcome == terminal, "the stored outcome is the later attempt's"
    assert await pending(redis, client) == 0
    assert len(standin.calls_with(rid + ".")) == 2, "the lease cannot stop the second call, only the second answer"
    assert busy.proc.poll() is None, "the woken worker goes on serving"


# ---- a client that gives up ----------------------------------------------------------------------


async def test_a_job_whose_client_gave_up_does_not_run_afterwards(
    spawn_worker: Any, client: LLMClient, standin: StandIn
) -> None:
    rid = "gave-up-" + marker()
    with pytest.raises(ReplyTimeout):
        await client.complete("openai", user(f"{rid}."), tenant_id="t", request_id=rid, timeout=1.0)
    await started(spawn_worker)
    for _ in range(100):
        if (outcome := await client.stored_outcome(rid)) is not None:
            break
        await asyncio.sleep(0.1)
    assert isinstance(outcome, Error) and outcome.code in (ErrorCode.CANCELLED, ErrorCode.EXPIRED)
    assert standin.calls_with(rid) == [], "nobody is billed for an answer nobody waits for"


# ---- Redis unreachable, or its stream deleted ----------------------------------------------------


async def test_a_worker_whose_redis_is_unreachable_stops_on_sigterm(spawn_worker: Any) -> None:
    port = free_port()  # nothing listens there
    process = spawn_worker(REDIS_URL=f"redis://:s3cret-pw@127.0.0.1:{port}/0", LLM_WORKER_SHUTDOWN_GRACE_S="5")
    for _ in range(300):
        if b"redis unavailable" in process.log_path.read_bytes():
            break
        await asyncio.sleep(0.05)
    started_at = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.proc.wait, 5) == 0
    assert time.monotonic() - started_at < 5
    [first, *_] = [line for line in process.log_lines() if line.get("event") == "redis unavailable, retrying"]
    assert f"127.0.0.1:{port}" in first["redis"] and "refused" in first["reason"].lower()
    assert "s3cret-pw" not in process.log_path.read_text()


async def test_a_deleted_job_stream_is_created_again(spawn_worker: Any, client: LLMClient, redis: aioredis.Redis) -> None:
    process = await started(spawn_worker)
    assert (await client.complete("ollama", user("before"), tenant_id="t", timeout=15)).content == "before"
    await redis.delete(client.keys.jobs)
    await asyncio.sleep(0.5)
    assert (await client.complete("ollama", user("after"), tenant_id="t", timeout=15)).content == "after"
    assert process.proc.poll() is None


# ---- the project's own command line --------------------------------------------------------------


async def test_ask_stream_starts_over_when_the_attempt_changes(spawn_worker: Any, settings: Any) -> None:
    await started(spawn_worker)
    env = worker_env(settings)

    def ask(model: str) -> subprocess.CompletedProcess[str]:
        cli = str(Path(sys.executable).with_name("llm-worker"))
        return subprocess.run([cli, "ask", "--stream", "--model", model, "a b c d e f"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    restarted = await asyncio.to_thread(ask, "restarts")
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.splitlines()[-1] == "a b c d e f", "the last attempt, from its start, on its own line"
    assert "attempt 2" in restarted.stderr
    broken = await asyncio.to_thread(ask, "always-breaks")
    assert broken.returncode == 1 and broken.stdout.endswith("\n"), "the error starts on a line of its own"
    assert "error interrupted" in broken.stderr
