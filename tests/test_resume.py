"""Resumable token streams: a reader that dies halfway picks up where it left off, from a new process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import defaultdict
from typing import Any

import pytest

from llm_pool_client import LLMClient
from llm_pool_contracts import Chunk, Done
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# A subscriber of its own: streams a resumable job and prints each chunk as a JSON line, until killed.
SUBSCRIBER = """
import asyncio, json, sys
from llm_pool_client import LLMClient

async def main(url, prefix, rid, prompt, model):
    async with LLMClient.from_url(url, prefix=prefix) as client:
        async for event in client.stream(model, [{"role": "user", "content": prompt}], tenant_id="t",
                                         request_id=rid, timeout=60, resumable=True):
            print(json.dumps({"attempt": event.attempt, "seq": event.seq, "text": getattr(event, "text", None)}), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def read_until_killed(settings: Any, rid: str, prompt: str, chunks: int, model: str = "openai") -> list[dict[str, Any]]:
    """Start the subscriber, read ``chunks`` chunks from it, then kill -9 it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, settings.redis_url.get_secret_value(), settings.prefix, rid, prompt, model,
        stdout=subprocess.PIPE, cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(chunks)]
    proc.kill()
    await proc.wait()
    return seen


def text_of_last_attempt(events: list[dict[str, Any]]) -> str:
    by_attempt: dict[int, str] = defaultdict(str)
    for event in events:
        by_attempt[event["attempt"]] += event["text"] or ""
    return by_attempt[max(by_attempt)]


async def resume(client: LLMClient, rid: str, last: dict[str, Any]) -> tuple[list[dict[str, Any]], Done]:
    rest: list[dict[str, Any]] = []
    async for event in client.resume(rid, after=(last["attempt"], last["seq"]), timeout=60):
        if isinstance(event, Done):
            return rest, event  # the iterator ends with its Done anyway
        assert isinstance(event, Chunk)
        rest.append({"attempt": event.attempt, "seq": event.seq, "text": event.text})
    raise AssertionError("no done")


async def test_a_killed_reader_resumes_with_nothing_lost_and_nothing_twice(
    spawn_worker: Any, settings: Any, client: LLMClient
) -> None:
    worker = spawn_worker()
    await asyncio.to_thread(worker.wait_ready)
    rid = "resume-" + uuid.uuid4().hex[:8]
    first = await read_until_killed(settings, rid, "#tokens=200 #slow=10", chunks=20)
    rest, done = await resume(client, rid, first[-1])
    assert text_of_last_attempt(first + rest) == done.content and done.usage.completion_tokens == 200
    seqs = [e["seq"] for e in first + rest]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every chunk once, in order, across the hand-over"
    late = [e async for e in client.resume(rid, timeout=10)]  # after the end: everything kept, then done
    assert isinstance(late[-1], Done) and "".join(e.text for e in late[:-1] if isinstance(e, Chunk)) == done.content


async def test_a_reader_resumes_across_a_worker_killed_mid_stream(
    spawn_worker: Any, settings: Any, client: LLMClient, redis: Any
) -> None:
    first_worker = spawn_worker()
    await asyncio.to_thread(first_worker.wait_ready)
    rid = "resume-kill-" + uuid.uuid4().hex[:8]
    first = await read_until_killed(settings, rid, "#tokens=120 #slow=40", chunks=10)
    first_worker.proc.kill()  # mid-stream: the job is taken over and starts again as attempt 2
    second_worker = spawn_worker()
    await asyncio.to_thread(second_worker.wait_ready)
    rest, done = await resume(client, rid, first[-1])
    assert done.attempt > first[-1]["attempt"], "the stream started again"
    assert text_of_last_attempt(first + rest) == done.content and done.usage.completion_tokens == 120
    assert await redis.ttl(client.keys.chunks(rid)) > 0, "the kept replies expire with the stored outcome"


async def test_a_job_that_is_not_resumable_keeps_nothing(worker: Any, client: LLMClient, redis: Any) -> None:
    rid = "plain-" + uuid.uuid4().hex[:8]
    events = [e async for e in client.stream("openai", [{"role": "user", "content": "#tokens=5"}], tenant_id="t",
                                             request_id=rid, timeout=20)]
    assert isinstance(events[-1], Done) and not await redis.exists(client.keys.chunks(rid))
