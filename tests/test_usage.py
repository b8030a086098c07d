"""The usage ledger (CONTRACT.md §8): known jobs at known prices, checked to the cent, through the
client and the command line; and counted once across a kill -9 and redeliveries."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Job, Result, Usage, encode
from tests.conftest import ROOT, RunningWorker, StandIn, worker_env
from tests.helpers import ghost_takes, in_flight, marker, user, wait_until

# the "ledger" group: $0.001 per prompt token, $0.002 per completion token


async def test_known_jobs_add_up_to_the_cent(client: LLMClient, settings: Any, router: Any, redis: aioredis.Redis) -> None:
    tenant = "acme-" + marker()
    stored_rid = "stored-" + marker()
    stored = Result(request_id=stored_rid, attempt=1, content="earlier", tool_calls=[], usage=Usage(100, 100), model="ledger",
                    provider_model="openai/stand-in-ledger", finish_reason="stop", cost_usd=0.3, tenant_id=tenant)
    await ghost_takes(redis, client, Job(request_id=stored_rid, tenant_id=tenant, model="ledger", messages=user("x")))
    await redis.set(client.keys.result(stored_rid), encode(stored), ex=60)  # its worker stored it, then died: counted then
    async with RunningWorker(settings, router):
        for _ in range(3):  # 3 prompt tokens, 10 completion tokens: $0.023 each
            await client.complete("ledger", user("a b c #tokens=10"), tenant_id=tenant, timeout=10)
        for _ in range(2):  # 2 and 5: $0.012 each
            [e async for e in client.stream("ledger", user("a b #tokens=5"), tenant_id=tenant, timeout=10)]
        with pytest.raises(JobFailed):
            await client.complete("ledger", user("x #fail=503"), tenant_id=tenant, timeout=20)
        first = await client.complete("unpriced", user("no price"), tenant_id=tenant, timeout=10)
        await client.complete("unpriced", user("again"), tenant_id=tenant, request_id=first.request_id, timeout=10)  # from the store
        await wait_until(lambda: _stored(client, stored_rid), 10, "the redelivered job answered from the store")
    rows = {r.group: r for r in await client.usage(tenant)}
    ledger, unpriced = rows["ledger"], rows["unpriced"]
    assert (ledger.requests, ledger.prompt_tokens, ledger.completion_tokens, ledger.estimated) == (6, 13, 40, 0)
    assert ledger.cost_nano_usd == 93_000_000 and f"{ledger.cost_usd:.2f}" == "0.09"
    assert ledger.errors == {"providers_unavailable": 1} and ledger.unpriced == 0
    assert (unpriced.requests, unpriced.unpriced, unpriced.cost_nano_usd) == (1, 1, 0), "the reused id was not counted again"
    assert set(rows) == {"ledger", "unpriced"}, "the stored answer's redelivery added nothing"
    printed = await asyncio.to_thread(cli_usage, settings, "--tenant", tenant, "--json")
    assert [(r["group"], r["requests"], r["cost_usd"]) for r in map(json.loads, printed.splitlines())] == [
        ("ledger", 6, 0.093), ("unpriced", 1, 0.0)]
    csv_out = await asyncio.to_thread(cli_usage, settings, "--tenant", tenant, "--by", "day", "--csv")
    header, row = csv_out.splitlines()
    assert header.startswith("tenant_id,day,requests") and row.split(",")[2] == "7"


async def _stored(client: LLMClient, rid: str) -> bool:
    return int((await client.redis.xpending(client.keys.jobs, client.keys.group))["pending"]) == 0


def cli_usage(settings: Any, *args: str) -> str:
    cli = str(Path(sys.executable).with_name("llm-worker"))
    done = subprocess.run([cli, "usage", *args], env=worker_env(settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


@pytest.mark.slow
async def test_a_kill_9_and_the_redelivery_count_each_reply_once(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, prefix: str, standin: StandIn
) -> None:
    tenant = "kill-" + marker()
    jobs = [Job(request_id=f"{tenant}-{i}", tenant_id=tenant, model="ledger",
                messages=user(f"{tenant}-{i}. #tokens=20 #slow=100"), stream=True) for i in range(4)]
    first = spawn_worker()
    await asyncio.to_thread(first.wait_ready)
    for job in jobs:
        await client.enqueue(job)
    await wait_until(lambda: _flights(redis, prefix, 4), 10, "four jobs in flight")
    first.proc.kill()
    second = spawn_worker()
    await asyncio.to_thread(second.wait_ready)
    await wait_until(lambda: _all_answered(client, jobs), 40, "every job answered")
    [row] = await client.usage(tenant)
    # each: 1 prompt token, 20 completion tokens = $0.041
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (4, 4, 80)
    assert row.cost_nano_usd == 164_000_000 and f"{row.cost_usd:.2f}" == "0.16"
    assert len(standin.calls_with(tenant)) == 8, "each job reached the model twice: counted once"


async def _flights(redis: aioredis.Redis, prefix: str, n: int) -> bool:
    return sum((await in_flight(redis, prefix)).values()) >= n


async def _all_answered(client: LLMClient, jobs: list[Job]) -> bool:
    return all(await asyncio.gather(*(client.stored_outcome(j.request_id) for j in jobs)))
