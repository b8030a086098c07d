"""No job lost, none billed twice: recovery, stored outcomes, dead letters, bad input, cancels, deadlines."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Chunk, Done, Error, ErrorCode, Job, Result, Usage, decode_reply, encode
from tests.conftest import RunningWorker, StandIn
from tests.helpers import Listener, ghost_takes, marker, user, wait_until

# ---- recovery -----------------------------------------------------------------------------


async def test_dead_workers_job_runs_again_as_a_later_attempt(
    client: LLMClient, redis: aioredis.Redis, settings: Any, router: Any, standin: StandIn
) -> None:
    mark = marker()
    job = Job(request_id="orphan-" + mark, tenant_id="t", model="openai", messages=user(f"{mark} left behind"), stream=True)
    await ghost_takes(redis, client, job)
    async with Listener(redis, client.keys.reply(job.request_id)) as listener, RunningWorker(settings, router):
        await listener.until(lambda r: any(isinstance(x, Done) for x in r))
    [done] = listener.terminals()
    assert done.attempt > 1 and done.content == f"{mark} left behind"
    assert all(c.attempt == done.attempt for c in listener.replies if isinstance(c, Chunk))
    assert len(standin.calls_with(mark)) == 1
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0
    consumers = [c["name"] for c in await redis.xinfo_consumers(client.keys.jobs, client.keys.group)]
    assert b"ghost-1-dead" not in consumers, "a dead consumer with nothing pending is removed from the group"


async def test_a_live_workers_long_job_is_never_taken(
    client: LLMClient, redis: aioredis.Redis, settings: Any, router: Any, standin: StandIn
) -> None:
    mark = marker()
    async with RunningWorker(settings, router):
        # 25 tokens, 120 ms apart: 3 s, six times the heartbeat interval
        stream = client.stream("openai", user(f"{mark} #tokens=25 #slow=120"), tenant_id="t", timeout=30)
        first_event = await stream.__anext__()
        async with RunningWorker(settings, router) as second:
            events = [first_event] + [e async for e in stream]
    assert {e.attempt for e in events} == {1}
    assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == 25
    assert len(standin.calls_with(mark)) == 1
    assert second.worker.stats.completed == 0


async def test_stored_outcome_answers_a_redelivery_without_calling_the_model(
    client: LLMClient, redis: aioredis.Redis, settings: Any, router: Any, standin: StandIn
) -> None:
    """A worker stored and published the outcome, then died before XACK."""
    mark = marker()
    job = Job(request_id="stored-" + mark, tenant_id="t", model="openai", messages=user(mark))
    stored = encode(Result(request_id=job.request_id, attempt=1, content="first answer", tool_calls=[], usage=Usage(1, 2),
                           model="openai", provider_model="openai/gpt-4o-mini", finish_reason="stop", cost_usd=0.5))
    await ghost_takes(redis, client, job)
    await redis.set(client.keys.result(job.request_id), stored, ex=60)
    async with Listener(redis, client.keys.reply(job.request_id)) as listener, RunningWorker(settings, router):
        await listener.until(lambda r: len(r) == 1)
    assert encode(listener.replies[0]) == stored, "the stored message, unchanged"
    assert standin.calls_with(mark) == []
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0


async def test_too_many_deliveries_end_in_the_dead_letter_stream(
    client: LLMClient, redis: aioredis.Redis, settings: Any, router: Any, standin: StandIn
) -> None:
    mark = marker()
    job = Job(request_id="poison-" + mark, tenant_id="t", model="openai", messages=user(mark))
    entry_id = await ghost_takes(redis, client, job)
    for ghost in ("ghost-2-dead", "ghost-3-dead"):  # two more deliveries to workers that died
        await redis.xclaim(client.keys.jobs, client.keys.group, ghost, 0, [entry_id])
    async with Listener(redis, client.keys.reply(job.request_id)) as listener, RunningWorker(settings, router):
        await listener.until(lambda r: len(r) == 1)
    [error] = listener.replies
    assert isinstance(error, Error) and error.code == ErrorCode.TOO_MANY_ATTEMPTS
    assert decode_reply(await redis.get(client.keys.result(job.request_id))) == error
    [(_, dead)] = await redis.xrange(client.keys.dead)
    assert dead[b"job"] == encode(job) and dead[b"code"] == b"too_many_attempts" and dead[b"attempts"] == b"4"
    assert standin.calls_with(mark) == []


async def test_a_reused_request_id_is_answered_from_the_store(client: LLMClient, worker: Any, standin: StandIn) -> None:
    """request_id is an idempotency key while the outcome is stored (CONTRACT.md §1), even when the
    second job asks for a stream and the stored answer is whole."""
    mark = marker()
    rid = "reuse-" + mark
    first = await client.complete("openai", user(mark), tenant_id="t", request_id=rid, timeout=10)
    events = [e async for e in client.stream("openai", user(mark + " again"), tenant_id="t", request_id=rid, timeout=10)]
    [done] = events
    assert isinstance(done, Done) and done.content == first.content and done.attempt == first.attempt
    assert len(standin.calls_with(mark)) == 1, "the model was called once"


async def test_answered_entries_do_not_pile_up(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    for i in range(5):
        await client.complete("ollama", user(f"n{i}"), tenant_id="t", timeout=10)
    await asyncio.sleep(0.1)
    assert await redis.xlen(client.keys.jobs) == 0


# ---- bad input ----------------------------------------------------------------------------

VALID = {"request_id": "bad-1", "tenant_id": "t", "model": "openai", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "body",
    [
        {**VALID, "messages": []},
        {**VALID, "messages": [{"content": "no role"}]},
        {**VALID, "tenant_id": "not valid!"},
        {**VALID, "stream": "yes"},
        {**VALID, "params": {"frequency_penalty": 1}},
        {**VALID, "deadline_ms": "tomorrow"},
        {k: v for k, v in VALID.items() if k != "model"},
    ],
)
async def test_each_invalid_field_is_answered_and_dead_lettered(
    body: dict[str, Any], client: LLMClient, worker: Any, redis: aioredis.Redis
) -> None:
    rid = "bad-" + uuid.uuid4().hex[:8]
    raw = json.dumps({**body, "request_id": rid}).encode()
    async with Listener(redis, client.keys.reply(rid)) as listener:
        await redis.xadd(client.keys.jobs, {"job": raw})
        [error] = await listener.until(lambda r: len(r) == 1)
    assert isinstance(error, Error) and error.code == ErrorCode.INVALID_JOB and error.request_id == rid
    assert decode_reply(await redis.get(client.keys.result(rid))) == error
    [(_, dead)] = await redis.xrange(client.keys.dead)
    assert dead[b"job"] == raw and dead[b"code"] == b"invalid_job" and dead[b"message"]
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0


async def test_oversized_job_is_refused_unread(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    limit = worker.worker.settings.max_job_bytes
    raw = json.dumps({**VALID, "request_id": "huge-1", "messages": [{"role": "user", "content": "x" * limit}]}).encode()
    async with Listener(redis, client.keys.reply("huge-1")) as listener:
        await redis.xadd(client.keys.jobs, {"job": raw})
        [error] = await listener.until(lambda r: len(r) == 1)
    assert error.code == ErrorCode.INVALID_JOB and "over the limit" in error.message
    [(_, dead)] = await redis.xrange(client.keys.dead)
    assert dead[b"job"] == raw[:4096], "only its first bytes are kept ..."
    assert int(dead[b"job_bytes"]) == len(raw) and dead[b"job_sha256"] == hashlib.sha256(raw).hexdigest().encode()
    assert dead[b"job_truncated"] == b"1"


async def test_the_dead_letter_stream_is_bounded(settings: Any, router: Any, client: LLMClient, redis: aioredis.Redis) -> None:
    async with RunningWorker(settings.model_copy(update={"dead_max_len": 5}), router):
        for i in range(12):
            await redis.xadd(client.keys.jobs, {"job": f"not json {i}".encode()})
        await wait_until(lambda: _all_acked(redis, client), 10, "every entry answered")
    dead = await redis.xrange(client.keys.dead)
    assert [fields[b"job"] for _, fields in dead] == [f"not json {i}".encode() for i in range(7, 12)], "the newest five"


async def _all_acked(redis: aioredis.Redis, client: LLMClient) -> bool:
    return int(await redis.xlen(client.keys.jobs)) == 0


async def test_entry_without_a_job_field_is_dead_lettered(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    await redis.xadd(client.keys.jobs, {"payload": b"{}"})
    for _ in range(100):
        if await redis.xlen(client.keys.dead):
            break
        await asyncio.sleep(0.05)
    [(_, dead)] = await redis.xrange(client.keys.dead)
    assert b"job" not in dead and dead[b"code"] == b"invalid_job"
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0


entry_values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"request_id": st.text(max_size=140) | st.integers(), "tenant_id": st.text(max_size=10),
         "model": st.text(max_size=10), "messages": st.lists(st.dictionaries(st.text(max_size=6), st.text(max_size=6)), max_size=2)},
        optional={"params": st.dictionaries(st.text(max_size=12), st.integers()), "stream": st.booleans() | st.text(max_size=3)},
    ).map(lambda v: json.dumps(v).encode()),
)
odd_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=20)
odd_values = st.one_of(
    # nested deeper than the decoder allows, in a known field or an unknown one
    st.tuples(st.integers(min_value=500, max_value=3000), st.sampled_from(["junk", "tools", "params"])).map(
        lambda d: json.dumps({**VALID, "request_id": "deep-1"}).encode()[:-1] + f', "{d[1]}": '.encode() + b"[" * d[0] + b"]" * d[0] + b"}"
    ),
    # lone surrogates (as JSON escapes, or as raw bytes), a BOM, bytes that are not UTF-8
    odd_text.map(lambda t: json.dumps({**VALID, "messages": [{"role": "user", "content": t}]}).encode()),
    odd_text.map(lambda t: json.dumps({**VALID, "tenant_id": t}, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    odd_text.map(lambda t: b"\xef\xbb\xbf" + json.dumps({**VALID, "model": t}).encode()),
)
entries = st.lists(st.dictionaries(st.sampled_from(["job", "other", ""]), entry_values | odd_values, min_size=0, max_size=2),
                   min_size=1, max_size=4)


@hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=entries)
async def test_no_input_crashes_or_stalls_the_worker(batch: list[dict[str, bytes]], client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    for fields in batch:
        if fields:
            await redis.xadd(client.keys.jobs, fields)  # type: ignore[arg-type]
        else:
            await redis.xadd(client.keys.jobs, {"job": b""})
    result = await client.complete("ollama", user("still here"), tenant_id="t", timeout=15)
    assert result.content == "still here"
    assert not worker.task.done()
    for _ in range(100):
        if (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0, "every entry was acknowledged"


# ---- cancellation and deadlines -----------------------------------------------------------


async def test_cancel_before_pickup_never_runs_the_job(client: LLMClient, worker: Any, standin: StandIn) -> None:
    mark = marker()
    rid = "cancel-early-" + mark
    await client.cancel(rid)
    with pytest.raises(JobFailed) as caught:
        await client.complete("openai", user(mark), tenant_id="t", request_id=rid, timeout=10)
    assert caught.value.code == ErrorCode.CANCELLED
    assert standin.calls_with(mark) == []


@pytest.mark.parametrize("group", ["openai", "anthropic", "ollama"])
async def test_cancel_during_a_stream_stops_it_and_closes_the_provider_connection(
    group: str, client: LLMClient, worker: Any, standin: StandIn
) -> None:
    mark = marker()
    rid = "cancel-live-" + mark
    chunks: list[Chunk] = []
    with pytest.raises(JobFailed) as caught:
        async for event in client.stream(group, user(f"{mark} #tokens=100 #slow=50"), tenant_id="t", request_id=rid, timeout=20):
            chunks.append(event)  # type: ignore[arg-type]
            if len(chunks) == 3:
                await client.cancel(rid)
    assert caught.value.code == ErrorCode.CANCELLED
    assert 3 <= len(chunks) < 20, "the stream stopped soon after the cancel"
    for _ in range(40):
        [call] = standin.calls_with(mark)
        if call["disconnected"]:
            break
        await asyncio.sleep(0.05)
    assert call["disconnected"], "the worker closed the provider connection"


async def test_cancel_after_the_end_changes_nothing(client: LLMClient, worker: Any) -> None:
    result = await client.complete("openai", user("finished"), tenant_id="t", timeout=10)
    await client.cancel(result.request_id)
    await asyncio.sleep(0.2)
    assert await client.stored_outcome(result.request_id) == result


async def test_deadline_already_past_is_expired_without_a_model_call(client: LLMClient, worker: Any, standin: StandIn) -> None:
    mark = marker()
    with pytest.raises(JobFailed) as caught:
        await client.complete("openai", user(mark), tenant_id="t", deadline_ms=int(time.time() * 1000) - 1, timeout=10)
    assert caught.value.code == ErrorCode.EXPIRED
    assert standin.calls_with(mark) == []


async def test_deadline_during_generation_stops_it(client: LLMClient, worker: Any) -> None:
    chunks = []
    with pytest.raises(JobFailed) as caught:
        async for event in client.stream("openai", user("#tokens=100 #slow=30"), tenant_id="t",
                                         deadline_ms=int(time.time() * 1000) + 600, timeout=10):
            chunks.append(event)
    assert caught.value.code == ErrorCode.EXPIRED
    assert 0 < len(chunks) < 100


# ---- provider faults -----------------------------------------------------------------------


async def test_hanging_provider_times_out_and_frees_the_slot(client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete("hangs", user("anyone?"), tenant_id="t", timeout=30)
    assert caught.value.code == ErrorCode.PROVIDERS_UNAVAILABLE
    for _ in range(50):  # the reply can reach us a moment before the worker hears Redis confirm it
        if not worker.worker.inbox.held:
            break
        await asyncio.sleep(0.02)
    assert not worker.worker.inbox.held, "no slot is held after the job ended"


async def test_job_past_the_worker_time_limit_is_timeout(settings: Any, router: Any, client: LLMClient) -> None:
    async with RunningWorker(settings.model_copy(update={"job_timeout_s": 0.5}), router):
        with pytest.raises(JobFailed) as caught:
            await client.complete("openai", user("#tokens=50 #slow=50"), tenant_id="t", timeout=10)
    assert caught.value.code == ErrorCode.TIMEOUT


async def test_broken_stream_starts_again_as_the_next_attempt(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    rid = "restart-" + uuid.uuid4().hex[:8]
    async with Listener(redis, client.keys.reply(rid)) as listener:
        await client.enqueue(Job(request_id=rid, tenant_id="t", model="always-breaks", messages=user("a b c d e f #slow=10"), stream=True))
        await listener.until(lambda r: any(not isinstance(x, Chunk) for x in r))
    first = [c.text for c in listener.replies if isinstance(c, Chunk) and c.attempt == 1]
    second = [c.text for c in listener.replies if isinstance(c, Chunk) and c.attempt == 2]
    assert "".join(first) == "".join(second) == "a b", "each attempt streamed from the start"
    [error] = listener.terminals()
    assert error.code == ErrorCode.INTERRUPTED and error.attempt == 2


async def test_client_keeps_only_the_attempt_that_finished(client: LLMClient, worker: Any) -> None:
    events = [e async for e in client.stream("flaky", user("one two three four #slow=10"), tenant_id="t", timeout=20)]
    done = events[-1]
    assert isinstance(done, Done) and done.content == "one two three four"
    last = [e for e in events if e.attempt == done.attempt]
    assert "".join(e.text for e in last if isinstance(e, Chunk)) == done.content


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "litellm"])
async def test_stream_that_falls_silent_is_cut_by_the_stream_timeout(lean: bool, client: LLMClient, worker: Any, router: Any) -> None:
    """stream_timeout (1 s for this deployment) bounds the wait for each chunk, on both paths."""
    router.lean_streams = lean
    started = time.monotonic()
    chunks = []
    with pytest.raises(JobFailed) as caught:
        async for event in client.stream("stalls", user("a b c d e f"), tenant_id="t", timeout=30):
            chunks.append(event)
    assert caught.value.code == ErrorCode.INTERRUPTED
    assert "".join(c.text for c in chunks if c.attempt == caught.value.error.attempt) == "a b"
    assert time.monotonic() - started < 10, "well before the job time limit of 20 s"
    router.lean_streams = True
