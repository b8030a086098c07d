"""Jobs through a running worker, real Redis, and real litellm talking HTTP to the stand-in model."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Chunk, Done, ErrorCode, Params, decode_reply
from tests.helpers import user

PROVIDERS = {
    "openai": "openai/gpt-4o-mini",
    "anthropic": "anthropic/claude-sonnet-4-5",
    "ollama": "ollama_chat/llama3.2",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
}


@pytest.fixture(params=["lean", "litellm"], autouse=True)
def stream_path(request: pytest.FixtureRequest, router: Any) -> Any:
    """Every test here runs on both stream paths: the lean parser and litellm's own."""
    router.lean_streams = request.param == "lean"
    yield request.param
    router.lean_streams = True


async def collect(client: LLMClient, model: str, text: str, **kwargs: Any) -> tuple[list[Chunk], Done]:
    chunks: list[Chunk] = []
    async for event in client.stream(model, user(text), tenant_id="tests", timeout=30, **kwargs):
        if isinstance(event, Chunk):
            chunks.append(event)
        else:
            return chunks, event
    raise AssertionError("the stream ended without done")


@pytest.mark.parametrize("group", PROVIDERS)
async def test_non_streamed_answer_carries_usage_model_and_cost(group: str, client: LLMClient, worker: Any) -> None:
    result = await client.complete(group, user("the quick brown fox"), tenant_id="tests", timeout=30)
    assert result.content == "the quick brown fox"
    assert result.tool_calls == []
    assert result.finish_reason == "stop"
    assert result.model == group
    assert result.provider_model == PROVIDERS[group]
    # the stand-in counts words: these are the provider's numbers, not a local estimate
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.estimated) == (4, 4, False)
    assert result.attempt == 1
    assert result.cost_usd is not None and result.cost_usd >= 0


@pytest.mark.parametrize("group", PROVIDERS)
async def test_streamed_answer_arrives_in_chunks_then_done(group: str, client: LLMClient, worker: Any) -> None:
    chunks, done = await collect(client, group, "one two three four five six #slow=20")
    assert len(chunks) >= 3, "tokens that arrive 20 ms apart are sent as they come"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert done.seq == len(chunks)
    assert "".join(c.text for c in chunks) == done.content == "one two three four five six"
    assert done.provider_model == PROVIDERS[group]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.estimated) == (6, 6, False)
    assert done.finish_reason == "stop"


@pytest.mark.parametrize("group", PROVIDERS)
async def test_tool_call_without_streaming(group: str, client: LLMClient, worker: Any) -> None:
    result = await client.complete(group, user("Oslo #tool"), tenant_id="tests", tools=[WEATHER_TOOL], timeout=30)
    assert result.content == ""
    assert result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"text": "Oslo"}


@pytest.mark.parametrize("group", PROVIDERS)
async def test_tool_call_assembled_from_a_stream(group: str, client: LLMClient, worker: Any) -> None:
    chunks, done = await collect(client, group, "Bergen #tool", tools=[WEATHER_TOOL])
    assert chunks == [] and done.content == ""
    assert done.finish_reason == "tool_calls"
    [call] = done.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"text": "Bergen"}


async def test_tool_call_message_on_the_wire_has_exactly_the_openai_keys(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    result = await client.complete("openai", user("x #tool"), tenant_id="tests", tools=[WEATHER_TOOL], timeout=30)
    stored = json.loads(await redis.get(client.keys.result(result.request_id)))
    assert stored["tool_calls"] == [
        {"id": result.tool_calls[0].id, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"text": "x"}'}}
    ]


async def test_fallback_to_the_next_deployment_of_the_group(client: LLMClient, worker: Any) -> None:
    result = await client.complete("fast", user("hello"), tenant_id="tests", timeout=30)
    assert result.content == "hello"
    assert result.model == "fast"
    assert result.provider_model == "openai/gpt-4o-mini"


async def test_fallback_from_quality_to_fast_shows_in_provider_model(client: LLMClient, worker: Any) -> None:
    result = await client.complete("quality", user("hello"), tenant_id="tests", timeout=30)
    assert result.model == "quality"
    assert result.provider_model == "openai/gpt-4o-mini"
    _, done = await collect(client, "quality", "streamed fallback")
    assert done.provider_model == "openai/gpt-4o-mini" and done.content == "streamed fallback"


@pytest.mark.parametrize("stream", [False, True])
async def test_all_providers_failing_gives_one_clear_error(stream: bool, client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    with pytest.raises(JobFailed) as caught:
        if stream:
            await collect(client, "broken", "hello")
        else:
            await client.complete("broken", user("hello"), tenant_id="tests", timeout=30)
    error = caught.value.error
    assert error.code == ErrorCode.PROVIDERS_UNAVAILABLE
    assert "broken" in error.message
    for secret_or_body in ("sk-test", "stand-in failure", "\n"):
        assert secret_or_body not in error.message
    stored = decode_reply(await redis.get(client.keys.result(error.request_id)))
    assert stored == error


async def test_provider_rejecting_the_request_is_bad_request(client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete("rejects", user("hello"), tenant_id="tests", timeout=30)
    assert caught.value.code == ErrorCode.BAD_REQUEST


async def test_unknown_group_is_unknown_model(client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete("no-such-group", user("hello"), tenant_id="tests", timeout=30)
    assert caught.value.code == ErrorCode.UNKNOWN_MODEL
    assert "no-such-group" in caught.value.message


async def test_deployment_with_unset_key_is_left_out(client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete("keyless", user("hello"), tenant_id="tests", timeout=30)
    assert caught.value.code == ErrorCode.UNKNOWN_MODEL


async def test_cost_is_null_without_a_price_and_exact_with_one(client: LLMClient, worker: Any) -> None:
    unpriced = await client.complete("unpriced", user("a b c"), tenant_id="tests", timeout=30)
    assert unpriced.cost_usd is None
    priced = await client.complete("custom-priced", user("a b c"), tenant_id="tests", timeout=30)
    assert priced.usage.prompt_tokens == 3 and priced.usage.completion_tokens == 3
    assert priced.cost_usd == pytest.approx(3 * 1e-6 + 3 * 2e-6)
    mapped = await client.complete("openai", user("a b c"), tenant_id="tests", timeout=30)
    assert mapped.cost_usd is not None and mapped.cost_usd > 0


async def test_params_reach_the_provider_and_length_is_reported(client: LLMClient, worker: Any) -> None:
    result = await client.complete(
        "openai", user("cut short #length"), tenant_id="tests", params=Params(max_tokens=2, temperature=0.0), timeout=30
    )
    assert result.finish_reason == "length"


async def test_missing_provider_usage_is_estimated(client: LLMClient, worker: Any) -> None:
    result = await client.complete("openai", user("count me please #nousage"), tenant_id="tests", timeout=30)
    assert result.usage.estimated is True
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


@pytest.mark.parametrize("group", PROVIDERS)
async def test_stream_cut_after_tokens_every_time_ends_interrupted(group: str, client: LLMClient, worker: Any) -> None:
    chunks: list[Chunk] = []
    with pytest.raises(JobFailed) as caught:
        async for event in client.stream(group, user("a b c d e f g #drop=3 #slow=10"), tenant_id="tests", timeout=30):
            assert isinstance(event, Chunk)
            chunks.append(event)
    assert caught.value.code == ErrorCode.INTERRUPTED
    assert caught.value.error.attempt == 2, "one restart from scratch, then the job gives up"
    for attempt in (1, 2):
        assert "".join(c.text for c in chunks if c.attempt == attempt) == "a b c"


async def test_outcome_is_stored_with_a_ttl(client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    result = await client.complete("ollama", user("keep me"), tenant_id="tests", timeout=30)
    key = client.keys.result(result.request_id)
    assert decode_reply(await redis.get(key)) == result
    ttl = await redis.ttl(key)
    assert 0 < ttl <= worker.worker.settings.result_ttl_s
    assert await client.stored_outcome(result.request_id) == result


@pytest.mark.parametrize("group", PROVIDERS)
async def test_both_stream_paths_give_the_same_messages(group: str, client: LLMClient, worker: Any, router: Any, stream_path: str) -> None:
    if stream_path != "lean":
        pytest.skip("compares the two paths itself")
    answers = {}
    for lean in (True, False):
        router.lean_streams = lean
        tapped_before = router.transport.split_count
        chunks, done = await collect(client, group, "alpha beta gamma delta #slow=5")
        with_tool = await collect(client, group, "Tromsø #tool", tools=[WEATHER_TOOL])
        used_lean = router.transport.split_count > tapped_before
        assert used_lean == (lean and group in ("openai", "anthropic")), "the lean path serves OpenAI and Anthropic streams"
        answers[lean] = [
            ("".join(c.text for c in chunks), done.content, done.usage, done.finish_reason, done.provider_model, done.cost_usd),
            ([(t.type, t.function.name, t.function.arguments) for t in with_tool[1].tool_calls], with_tool[1].finish_reason,
             with_tool[1].usage),
        ]
    assert answers[True] == answers[False]
