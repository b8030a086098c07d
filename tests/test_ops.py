"""The operator's probes and views, through the real command line against a real worker process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_contracts import Heartbeat, Job, Result, encode
from tests.conftest import ROOT, worker_env
from tests.helpers import ghost_takes, marker, user, wait_until

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).with_name("llm-worker"))


def llm_worker(settings: Any, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=worker_env(settings, **env), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


async def test_health_follows_the_workers_heartbeat(spawn_worker: Any, settings: Any, redis: aioredis.Redis) -> None:
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    consumer = next(line["consumer"] for line in process.log_lines() if line.get("event") == "worker ready")
    for args in ((), ("--consumer", consumer), ("--pid", str(process.proc.pid))):
        done = await asyncio.to_thread(llm_worker, settings, "health", *args)
        assert done.returncode == 0 and consumer in done.stdout, done.stderr
    assert await asyncio.to_thread(process.stop) == 0
    gone = await asyncio.to_thread(llm_worker, settings, "health", "--consumer", consumer)
    assert gone.returncode == 1 and gone.stderr.strip() == f"health: no heartbeat of consumer {consumer}"
    stale = Heartbeat(consumer="stuck-1", host="h", pid=1, version="0", started_at_ms=0,
                      heartbeat_at_ms=int(time.time() * 1000) - 60_000, in_flight=1, completed=0, failed=0)
    await redis.set(f"{settings.prefix}:worker:stuck-1", encode(stale), ex=60)  # alive in Redis, silent for a minute
    old = await asyncio.to_thread(llm_worker, settings, "health", "--consumer", "stuck-1")
    assert old.returncode == 1 and "60." in old.stderr and "old" in old.stderr
    away = await asyncio.to_thread(llm_worker, settings, "health", "--redis-url", "redis://127.0.0.1:1/0")
    assert away.returncode == 1 and "does not answer" in away.stderr


async def test_ready_needs_a_deployment_for_every_group(spawn_worker: Any, settings: Any) -> None:
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    missing = await asyncio.to_thread(llm_worker, settings, "ready")
    assert missing.returncode == 1 and "keyless" in missing.stderr.splitlines()[-1], "its only deployment lacks a key"
    ready = await asyncio.to_thread(llm_worker, settings, "ready", LLM_POOL_TEST_UNSET_KEY="sk-set-now")
    assert ready.returncode == 0 and "keyless" in ready.stdout
    assert await asyncio.to_thread(process.stop) == 0


def test_models_lists_groups_in_order_and_never_a_key(settings: Any) -> None:
    done = llm_worker(settings, "models")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert "fast: ollama_chat/fail-503 → openai/gpt-4o-mini" in lines
    assert "fallback: quality → fast" in lines
    assert "left out (API key variable unset): keyless:openai/gpt-4o-mini" in lines
    assert "sk-test" not in done.stdout + done.stderr


async def test_dead_letters_are_listed_replayed_for_real_and_purged(
    spawn_worker: Any, settings: Any, client: Any, redis: aioredis.Redis, standin: Any
) -> None:
    mark = marker()
    job = Job(request_id="dead-" + mark, tenant_id="t", model="openai", messages=user(f"{mark} replayed"))
    entry_id = await ghost_takes(redis, client, job)
    for ghost in ("ghost-2-dead", "ghost-3-dead"):  # two more deliveries to workers that died
        await redis.xclaim(client.keys.jobs, client.keys.group, ghost, 0, [entry_id])
    await redis.xadd(client.keys.jobs, {"job": b"not json"})
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    await wait_until(lambda: _dead_count(redis, client, 2), 15, "two dead letters")
    listed = [json.loads(line) for line in (await asyncio.to_thread(llm_worker, settings, "dead", "list", "--json")).stdout.splitlines()]
    assert sorted(row["code"] for row in listed) == ["invalid_job", "too_many_attempts"]
    [tired] = [row for row in listed if row["code"] == "too_many_attempts"]
    assert tired["request_id"] == job.request_id
    shown = await asyncio.to_thread(llm_worker, settings, "dead", "show", tired["id"])
    assert "code: too_many_attempts" in shown.stdout and f"{mark} replayed" in shown.stdout
    replayed = await asyncio.to_thread(llm_worker, settings, "dead", "replay", tired["id"])
    assert replayed.returncode == 0 and "replayed" in replayed.stdout
    await wait_until(lambda: _answered(client, job.request_id), 15, "the replayed job's answer")
    assert len(standin.calls_with(mark)) == 1, "the replay reached the model, not the old stored error"
    [invalid] = [row for row in listed if row["code"] == "invalid_job"]
    refused = await asyncio.to_thread(llm_worker, settings, "dead", "replay", invalid["id"])
    assert refused.returncode == 1 and "not JSON" in refused.stderr
    purged = await asyncio.to_thread(llm_worker, settings, "dead", "purge")
    assert purged.stdout.strip() == "purged 1 dead letters" and await redis.xlen(client.keys.dead) == 0
    assert await asyncio.to_thread(process.stop) == 0


async def _dead_count(redis: aioredis.Redis, client: Any, n: int) -> bool:
    return int(await redis.xlen(client.keys.dead)) >= n


async def _answered(client: Any, request_id: str) -> bool:
    return isinstance(await client.stored_outcome(request_id), Result)


async def test_status_shows_live_workers_and_the_queue(spawn_worker: Any, settings: Any, client: Any, redis: aioredis.Redis) -> None:
    process = spawn_worker()
    await asyncio.to_thread(process.wait_ready)
    consumer = next(line["consumer"] for line in process.log_lines() if line.get("event") == "worker ready")
    busy = asyncio.create_task(client.complete("openai", user("#tokens=30 #slow=100"), tenant_id="t", timeout=30))
    await wait_until(lambda: _pending(redis, client, 1), 10, "the job pending")
    await asyncio.sleep(1.2)  # a heartbeat that counts it
    as_json = json.loads((await asyncio.to_thread(llm_worker, settings, "status", "--json")).stdout)
    [worker] = as_json["workers"]
    assert worker["consumer"] == consumer and worker["pid"] == process.proc.pid and worker["in_flight"] == 1
    assert worker["heartbeat_age_s"] < 3 * settings.heartbeat_s
    queue = as_json["queue"]
    assert queue["pending"] == 1 and queue["lag"] == 0 and queue["oldest_pending_s"] is not None and queue["dead_letters"] == 0
    assert [lane["lane"] for lane in as_json["lanes"]] == ["interactive", "batch"] and as_json["lanes"][1]["pending"] == 0
    table = (await asyncio.to_thread(llm_worker, settings, "status")).stdout  # rich wraps long cells at 80 columns
    assert "workers (1)" in table and "queue" in table and str(process.proc.pid) in table
    await busy
    assert await asyncio.to_thread(process.stop) == 0


async def _pending(redis: aioredis.Redis, client: Any, n: int) -> bool:
    return int((await redis.xpending(client.keys.jobs, client.keys.group))["pending"]) >= n
