"""Fast tests of single parts: the model config loader, settings, the publisher and its finish script."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llm_pool_contracts import Chunk, Done, Error, ErrorCode, Keys, Usage, decode_reply, encode
from llm_pool_worker.connections import ensure_group
from llm_pool_worker.finisher import DeadLetter, Finish, Outcome
from llm_pool_worker.inbox import Ack
from llm_pool_worker.model_config import ConfigError, load_model_config, parse_model_config
from llm_pool_worker.publisher import Publisher
from llm_pool_worker.settings import BUNDLED_CONFIG, Settings


def entry(group: str, model: str, **params: Any) -> dict[str, Any]:
    return {"model_name": group, "litellm_params": {"model": model, **params}}


def test_deployment_with_an_unset_key_is_left_out_and_its_fallbacks_pruned(caplog: Any) -> None:
    raw = {
        "model_list": [
            entry("fast", "ollama_chat/llama3.2"),
            entry("quality", "anthropic/claude-sonnet-4-5", api_key="os.environ/ANTHROPIC_API_KEY"),
        ],
        "router_settings": {"fallbacks": [{"quality": ["fast"]}, {"fast": ["quality"]}], "num_retries": 2},
    }
    config = parse_model_config(raw, env={})
    assert config.groups == {"fast"}
    assert config.left_out == ("quality:anthropic/claude-sonnet-4-5",)
    assert config.router_settings["fallbacks"] == []
    assert config.router_settings["num_retries"] == 2
    with_key = parse_model_config(raw, env={"ANTHROPIC_API_KEY": "sk-ant-secret"})
    assert with_key.groups == {"fast", "quality"}
    assert with_key.router_settings["fallbacks"] == [{"quality": ["fast"]}, {"fast": ["quality"]}]
    # the reference stays unresolved: litellm resolves it, and the secret never sits in our config
    [quality] = [d for d in with_key.deployments if d.group == "quality"]
    assert quality.params["api_key"] == "os.environ/ANTHROPIC_API_KEY"


def test_bundled_config_has_fast_and_quality_in_order() -> None:
    config = load_model_config(BUNDLED_CONFIG, env={"OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "y"})
    order = {g: [d.model for d in sorted(config.deployments, key=lambda d: d.params["order"]) if d.group == g] for g in config.groups}
    assert order["fast"][0].startswith("ollama_chat/") and order["fast"][1].startswith("openai/")
    assert order["quality"][0].startswith("anthropic/") and order["quality"][1].startswith("openai/")
    assert config.router_settings["fallbacks"] == [{"quality": ["fast"]}]
    only_local = load_model_config(BUNDLED_CONFIG, env={})
    assert only_local.groups == {"fast"}


@pytest.mark.parametrize(
    "raw",
    [{}, {"model_list": []}, {"model_list": [{"model_name": "x"}]}, {"model_list": [entry("g", "m", api_key="os.environ/NOPE")]},
     {"model_list": [entry("g", "m")], "router_settings": {"fallbacks": ["g"]}}],
)
def test_unusable_configs_are_refused_clearly(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_model_config(raw, env={})


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_model_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_list: [")
    with pytest.raises(ConfigError):
        load_model_config(bad)


def test_settings_come_from_the_contract_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@example:6379/1")
    monkeypatch.setenv("LLM_WORKER_CONCURRENCY", "7")
    monkeypatch.setenv("LLM_WORKER_PREFIX", "p1")
    monkeypatch.setenv("LLM_WORKER_JOB_TIMEOUT_S", "12.5")
    settings = Settings()
    assert settings.concurrency == 7 and settings.prefix == "p1" and settings.job_timeout_s == 12.5
    assert "hunter2" not in repr(settings), "the Redis password stays out of reprs and logs"
    assert Settings(concurrency=3).concurrency == 3, "flags override the environment"


# ---- publisher and finisher (Lua: a real redis-server) ---------------------------------------------


async def taken(redis: Any, keys: Keys, consumer: str = "c1", job: bytes = b"{}") -> Ack:
    """An entry read by ``consumer``: what a Delivery would carry."""
    await ensure_group(redis, keys)
    entry_id = await redis.xadd(keys.jobs, {"job": job})
    await redis.xreadgroup(keys.group, consumer, {keys.jobs: ">"})
    return Ack(keys.jobs, keys.group, consumer, entry_id)


@pytest.fixture
async def publisher(redis: Any, prefix: str) -> Any:
    pub = Publisher(redis, Keys(prefix), result_ttl_s=60)
    await pub.start()
    yield pub
    await pub.close(timeout_s=5)


def done(rid: str, attempt: int, content: str = "abc") -> Done:
    return Done(request_id=rid, attempt=attempt, content=content, tool_calls=[], usage=Usage(1, 3), model="m",
                provider_model="p", finish_reason="stop", cost_usd=None, seq=0)


async def test_chunks_then_done_in_order_with_the_final_seq(redis: Any, publisher: Publisher) -> None:
    keys = publisher.keys
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply("r1"))
    ack = await taken(redis, keys)
    reply = publisher.stream("r1", attempt=2)
    for text in ("a", "b", "c"):
        reply.send_text(text)
        await asyncio.sleep(0)
    assert await publisher.finish(Outcome(ack, "r1", 2, done("r1", 2)), reply) is Finish.FINISHED
    received = []
    while not received or not isinstance(received[-1], Done):  # the first read is the subscribe confirmation
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            received.append(decode_reply(message["data"]))
    await pubsub.aclose()
    chunks = [m for m in received if isinstance(m, Chunk)]
    assert "".join(c.text for c in chunks) == "abc"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert isinstance(received[-1], Done) and received[-1].seq == len(chunks) and received[-1].attempt == 2
    assert decode_reply(await redis.get(keys.result("r1"))) == received[-1]
    assert (await redis.xpending(keys.jobs, keys.group))["pending"] == 0, "acknowledged after storing"
    assert await redis.xlen(keys.jobs) == 0, "and deleted from the stream"


async def test_dead_letter_keeps_the_raw_job(redis: Any, publisher: Publisher) -> None:
    keys = publisher.keys
    ack = await taken(redis, keys, job=b"\xffnot json")
    error = Error(request_id="r2", attempt=1, code=ErrorCode.INVALID_JOB, message="invalid job: not JSON")
    dead = DeadLetter(b"\xffnot json", "invalid_job", "not JSON", 1, "c1")
    assert await publisher.finish(Outcome(ack, "r2", 1, error, dead), None) is Finish.FINISHED
    [(_, fields)] = await redis.xrange(keys.dead)
    assert fields[b"job"] == b"\xffnot json"
    assert fields[b"code"] == b"invalid_job" and fields[b"attempts"] == b"1" and fields[b"consumer"] == b"c1"
    assert int(fields[b"failed_at_ms"]) > 0
    assert decode_reply(await redis.get(keys.result("r2"))) == error


async def test_an_outcome_of_a_job_another_worker_owns_is_fenced(redis: Any, publisher: Publisher) -> None:
    """A worker that lost its lease (paused, cut off) must not answer for the job's new owner."""
    keys = publisher.keys
    ack = await taken(redis, keys, consumer="c1")
    await redis.xclaim(keys.jobs, keys.group, "c2", 0, [ack.entry_id])
    assert await publisher.finish(Outcome(ack, "r3", 1, done("r3", 1)), None) is Finish.FENCED
    assert await redis.get(keys.result("r3")) is None
    assert (await redis.xpending(keys.jobs, keys.group))["consumers"] == [{"name": b"c2", "pending": 1}]


async def test_an_outcome_after_another_worker_answered_is_dropped(redis: Any, publisher: Publisher) -> None:
    keys = publisher.keys
    ack = await taken(redis, keys, consumer="c1")
    await redis.xclaim(keys.jobs, keys.group, "c2", 0, [ack.entry_id])
    theirs = Outcome(Ack(keys.jobs, keys.group, "c2", ack.entry_id), "r4", 3, done("r4", 3, "theirs"))
    assert await publisher.finish(theirs, None) is Finish.FINISHED
    assert await publisher.finish(Outcome(ack, "r4", 1, done("r4", 1, "mine")), None) is Finish.ANSWERED
    stored = decode_reply(await redis.get(keys.result("r4")))
    assert isinstance(stored, Done) and stored.content == "theirs" and stored.attempt == 3


async def test_a_lower_attempt_never_overwrites_a_stored_outcome(redis: Any, publisher: Publisher) -> None:
    keys = publisher.keys
    ack = await taken(redis, keys)
    await redis.set(keys.result("r5"), encode(done("r5", 4, "higher")))
    assert await publisher.finish(Outcome(ack, "r5", 1, done("r5", 1, "lower")), None) is Finish.SUPERSEDED
    assert decode_reply(await redis.get(keys.result("r5"))).content == "higher"  # type: ignore[union-attr]
    assert (await redis.xpending(keys.jobs, keys.group))["pending"] == 0, "the entry is acknowledged all the same"


async def test_a_job_whose_entry_vanished_is_still_answered(redis: Any, publisher: Publisher) -> None:
    """An operator deleted the stream while the job ran: the orchestrator still gets its answer."""
    keys = publisher.keys
    ack = await taken(redis, keys)
    await redis.delete(keys.jobs)
    assert await publisher.finish(Outcome(ack, "r6", 1, done("r6", 1)), None) is Finish.FINISHED
    assert await redis.get(keys.result("r6")) is not None
