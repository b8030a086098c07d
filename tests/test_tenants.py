"""Tenants' limits from the model config: a daily budget, read from the usage ledger."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import ErrorCode, Job, decode_reply
from llm_pool_worker.model_config import check_model_config
from tests.conftest import StandIn
from tests.helpers import marker, most_open_at_once, until_stored, user


async def test_a_tenant_past_its_daily_budget_is_refused_without_a_model_call(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, config_path: Path, standin: StandIn, tmp_path: Path
) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["tenants"] = {"thrifty": {"daily_budget_usd": 0.05}, "default": {"daily_budget_usd": None}}
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(config))
    worker = spawn_worker(LLM_WORKER_CONFIG=str(tmp_path / "tenants.yaml"))
    await asyncio.to_thread(worker.wait_ready)
    mark = marker()
    spent = []
    with pytest.raises(JobFailed) as refused:
        for i in range(20):  # the "ledger" group costs $0.001 a prompt token and $0.002 a completion token
            result = await client.complete("ledger", user(f"{mark} {i} #tokens=5"), tenant_id="thrifty", timeout=20)
            spent.append(result.cost_usd)
    assert refused.value.code == ErrorCode.QUOTA_EXCEEDED and "daily budget is $0.05" in refused.value.message
    assert sum(spent[:-1]) < 0.05 <= sum(spent), "refused from the first job after the budget was reached"
    assert len(standin.calls_with(mark)) == len(spent), "the refused job never reached the model"
    [row] = await client.usage(tenant_id="thrifty")
    assert row.errors == {"quota_exceeded": 1} and abs(row.cost_usd - sum(spent)) < 1e-9
    assert await redis.xlen(client.keys.dead) == 0, "a refusal is not dead-lettered"
    stored = decode_reply(await redis.get(client.keys.result(refused.value.error.request_id)))
    assert stored == refused.value.error
    other = await client.complete("ledger", user(f"{mark} other"), tenant_id="rich", timeout=20)
    assert other.content == f"{mark} other", "other tenants are not limited"
    assert await asyncio.to_thread(worker.stop) == 0


def test_check_config_names_a_bad_tenant_limit_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "model_list:\n  - model_name: fast\n    litellm_params: {model: openai/gpt-4o-mini, api_key: sk-x}\n"
        "tenants:\n  default: {daily_budget_usd: 10}\n  acme: {daily_budget: 5}\n"
    )
    [problem] = check_model_config(path)
    assert problem.startswith(f"{path}:6: tenant `acme`") and "daily_budget_usd" in problem


# ---- the waiting room: fair turns, limits across the pool ------------------------------------------


def tenants_config(config_path: Path, tmp_path: Path, tenants: dict[str, Any]) -> str:
    config = yaml.safe_load(config_path.read_text())
    config["tenants"] = tenants
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def pool_of(spawn_worker: Any, config: str, workers: int = 2, concurrency: int = 2) -> list[Any]:
    started = [spawn_worker(LLM_WORKER_CONFIG=config, LLM_WORKER_CONCURRENCY=str(concurrency)) for _ in range(workers)]
    for process in started:
        await asyncio.to_thread(process.wait_ready)
    return started


async def test_one_tenants_flood_does_not_hold_up_another_tenants_job(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, config_path: Path, tmp_path: Path
) -> None:
    await pool_of(spawn_worker, tenants_config(config_path, tmp_path, {"default": {}}))
    mark = marker()
    flood = [Job(request_id=f"{mark}-a{i}", tenant_id="flood", model="openai", messages=user(f"{mark} a{i} #tokens=4 #slow=50"))
             for i in range(300)]  # 0.2 s each on four slots: 15 s of work
    for job in flood:
        await client.enqueue(job)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    answer = await client.complete("openai", user(f"{mark} b"), tenant_id="single", timeout=30)
    waited = time.monotonic() - started
    done = sum(v is not None for v in await redis.mget([client.keys.result(j.request_id) for j in flood]))
    assert answer.content == f"{mark} b"
    assert done < 100, f"the other tenant's job went ahead of the flood ({done} of 300 done, waited {waited:.2f} s)"


async def test_a_tenants_jobs_in_flight_are_limited_across_the_pool(
    spawn_worker: Any, client: LLMClient, config_path: Path, standin: StandIn, tmp_path: Path
) -> None:
    await pool_of(spawn_worker, tenants_config(config_path, tmp_path, {"narrow": {"max_in_flight": 2}}), concurrency=4)
    mark = marker()
    narrow = [asyncio.create_task(client.complete("openai", user(f"{mark} n{i} #tokens=4 #slow=50"), tenant_id="narrow",
                                                  timeout=30)) for i in range(8)]
    await asyncio.sleep(0.3)
    other = await client.complete("openai", user(f"{mark} other"), tenant_id="wide", timeout=30)
    results = await asyncio.gather(*narrow)
    calls = [c for c in standin.calls_with(mark) if " n" in c["text"]]
    assert most_open_at_once(calls) == 2, "two at a time, over eight free slots on two workers"
    assert len(calls) == 8 and all(r.usage.completion_tokens == 4 for r in results)
    assert other.content == f"{mark} other", "waiting jobs hold no slot: another tenant's job ran meanwhile"


async def test_a_job_waiting_past_its_deadline_ends_expired_without_a_model_call(
    spawn_worker: Any, client: LLMClient, config_path: Path, standin: StandIn, tmp_path: Path
) -> None:
    await pool_of(spawn_worker, tenants_config(config_path, tmp_path, {"default": {"rpm": 2}}))
    if 60 - time.time() % 60 < 8:  # the rpm window is the minute: start well inside one
        await asyncio.sleep(60 - time.time() % 60 + 0.5)
    mark = marker()
    deadline = int((time.time() + 3) * 1000)
    outcomes = await asyncio.gather(*[
        client.complete("openai", user(f"{mark} {i}"), tenant_id="slow", deadline_ms=deadline, timeout=10) for i in range(4)
    ], return_exceptions=True)
    expired = [o for o in outcomes if isinstance(o, JobFailed) and o.code == ErrorCode.EXPIRED]
    assert len(expired) == 2 and len(standin.calls_with(mark)) == 2, outcomes


async def test_waiting_jobs_survive_a_worker_killed(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, config_path: Path, standin: StandIn, tmp_path: Path
) -> None:
    workers = await pool_of(spawn_worker, tenants_config(config_path, tmp_path, {"default": {"max_in_flight": 2}}))
    mark, jobs = await queue_up(client, 12, slow_ms=80)
    await asyncio.sleep(0.8)
    workers[0].proc.kill()
    await each_ran_once(client, redis, standin, mark, jobs)


async def queue_up(client: LLMClient, count: int, slow_ms: int) -> tuple[str, list[Job]]:
    mark = marker()
    jobs = [Job(request_id=f"{mark}-{i}", tenant_id="t", model="openai", messages=user(f"{mark} {i}. #tokens=4 #slow={slow_ms}"))
            for i in range(count)]
    for job in jobs:
        await client.enqueue(job)
    return mark, jobs


async def each_ran_once(client: LLMClient, redis: aioredis.Redis, standin: StandIn, mark: str, jobs: list[Job]) -> None:
    """Every job answered, none called the model more than twice (a redelivery), nothing left behind."""
    for job in jobs:
        await until_stored(client, job.request_id, timeout=40)
    calls = collections.Counter(c["text"].split(".")[0] for c in standin.calls_with(mark))
    assert len(calls) == len(jobs) and max(calls.values()) <= 2
    assert await redis.keys(f"{client.keys.prefix}:wait:*") == [], "no job left waiting"
    for stream in (*client.keys.lanes(), client.keys.run("interactive")):
        assert (await redis.xpending(stream, client.keys.group))["pending"] == 0


async def test_waiting_jobs_survive_a_redis_restart(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, redis_server: Any, config_path: Path, standin: StandIn,
    tmp_path: Path,
) -> None:
    await pool_of(spawn_worker, tenants_config(config_path, tmp_path, {"default": {"max_in_flight": 1}}))
    mark, jobs = await queue_up(client, 8, slow_ms=50)
    await asyncio.sleep(0.5)
    assert await redis.llen(client.keys.wait("interactive", "t")) >= 4, "most of them wait their turn"
    await asyncio.to_thread(redis_server.stop)  # SIGTERM: with AOF (appendfsync always) nothing written is lost
    await asyncio.to_thread(redis_server.start)
    with contextlib.suppress(aioredis.ConnectionError):
        await redis.ping()  # its connection died with the server: the next command opens a new one
    await each_ran_once(client, redis, standin, mark, jobs)
