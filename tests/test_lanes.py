"""Two lanes: interactive jobs go first, batch jobs still get their share; a full lane refuses jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm_pool_client import LLMClient, QueueFull
from llm_pool_contracts import Job
from tests.conftest import RunningWorker, StandIn
from tests.helpers import marker, most_open_at_once, until_stored, user


async def test_interactive_jobs_go_first_and_batch_keeps_its_share(
    client: LLMClient, settings: Any, router: Any, standin: StandIn
) -> None:
    mark = marker()
    lanes = settings.model_copy(update={"concurrency": 10, "batch_share": 0.1})  # one slot owed to batch

    async def job(lane: str, i: int) -> None:
        await client.complete("openai", user(f"{mark} {lane} {i} #tokens=5 #slow=60"), tenant_id="t", timeout=60, priority=lane)

    # the batch flood is enqueued first: by arrival alone it would all run before the chat jobs
    batch = [asyncio.create_task(job("batch", i)) for i in range(30)]
    await asyncio.sleep(0.3)
    chat = [asyncio.create_task(job("interactive", i)) for i in range(30)]
    await asyncio.sleep(0.3)
    async with RunningWorker(lanes, router):
        await asyncio.gather(*chat, *batch)
    calls = standin.calls_with(mark)
    last_chat_start = max(c["at"] for c in calls if " interactive " in c["text"])
    batch_before = [c for c in calls if " batch " in c["text"] and c["at"] < last_chat_start]
    assert 1 <= len(batch_before) <= 8, f"{len(batch_before)} batch jobs started while chat jobs waited"
    assert most_open_at_once(calls) <= 10


async def test_a_batch_lane_alone_uses_every_slot(client: LLMClient, settings: Any, router: Any, standin: StandIn) -> None:
    mark = marker()
    async with RunningWorker(settings.model_copy(update={"concurrency": 8}), router):
        await asyncio.gather(*[
            client.complete("openai", user(f"{mark} {i} #tokens=5 #slow=100"), tenant_id="t", timeout=60, priority="batch")
            for i in range(16)
        ])
    assert most_open_at_once(standin.calls_with(mark)) == 8


async def test_a_full_lane_refuses_new_jobs_and_takes_them_again_once_drained(
    client: LLMClient, settings: Any, router: Any
) -> None:
    limited = settings.model_copy(update={"max_backlog": 5})
    async with RunningWorker(limited, router):
        pass  # a worker announces the lanes' limits when it starts
    jobs = [Job(request_id=f"{marker()}-{i}", tenant_id="t", model="openai", messages=user("queued")) for i in range(6)]
    for job in jobs[:5]:
        await client.enqueue(job)
    with pytest.raises(QueueFull) as full:
        await client.enqueue(jobs[5])
    assert (full.value.lane, full.value.backlog, full.value.limit) == ("interactive", 5, 5)
    await client.enqueue(jobs[5], priority="batch")  # the other lane has its own limit
    with pytest.raises(QueueFull):
        await client.complete("openai", user("refused"), tenant_id="t", timeout=5)
    async with RunningWorker(limited, router):
        for job in jobs:
            await until_stored(client, job.request_id)
        answer = await client.complete("openai", user("taken again"), tenant_id="t", timeout=30)
    assert answer.content == "taken again"



async def test_an_unknown_lane_is_refused_before_anything_is_sent(client: LLMClient) -> None:
    with pytest.raises(ValueError, match="unknown lane"):
        await client.complete("openai", user("x"), tenant_id="t", timeout=5, priority="urgent")
