"""Fast tests of single parts: the model config loader, the publisher (on fakeredis), settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from contracts import Chunk, Done, Error, ErrorCode, Keys, Usage, decode_reply
from worker.model_config import ConfigError, load_model_config, parse_model_config
from worker.publisher import DeadLetter, Publisher
from worker.settings import BUNDLED_CONFIG, Settings


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


# ---- publisher ------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> Any:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    keys = Keys("u")
    await redis.xgroup_create(keys.jobs, keys.group, id="$", mkstream=True)
    yield redis, keys
    await redis.aclose()


async def test_chunks_then_done_in_order_with_the_final_seq(fake: Any) -> None:
    redis, keys = fake
    publisher = Publisher(redis, keys, result_ttl_s=60)
    await publisher.start()
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply("r1"))
    entry_id = await redis.xadd(keys.jobs, {"job": b"{}"})
    await redis.xreadgroup(keys.group, "c1", {keys.jobs: ">"})
    reply = publisher.channel("r1", attempt=2)
    for text in ("a", "b", "c"):
        reply.send_text(text)
        await asyncio.sleep(0)
    done = Done(request_id="r1", attempt=2, content="abc", tool_calls=[], usage=Usage(1, 3), model="m",
                provider_model="p", finish_reason="stop", cost_usd=None, seq=0)
    await reply.finish(done, entry_id)
    received = []
    while not received or not isinstance(received[-1], Done):  # the first read is the subscribe confirmation
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            received.append(decode_reply(message["data"]))
    chunks = [m for m in received if isinstance(m, Chunk)]
    assert "".join(c.text for c in chunks) == "abc"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert isinstance(received[-1], Done) and received[-1].seq == len(chunks) and received[-1].attempt == 2
    assert decode_reply(await redis.get(keys.result("r1"))) == received[-1]
    assert (await redis.xpending(keys.jobs, keys.group))["pending"] == 0, "acknowledged after storing"
    await publisher.close(timeout_s=5)


async def test_dead_letter_keeps_the_raw_job(fake: Any) -> None:
    redis, keys = fake
    publisher = Publisher(redis, keys, result_ttl_s=60)
    await publisher.start()
    entry_id = await redis.xadd(keys.jobs, {"job": b"\xffnot json"})
    await redis.xreadgroup(keys.group, "c1", {keys.jobs: ">"})
    error = Error(request_id="r2", attempt=1, code=ErrorCode.INVALID_JOB, message="invalid job: not JSON")
    await publisher.outcome(publisher.channel("r2", 1), error, entry_id, DeadLetter(b"\xffnot json", "invalid_job", "not JSON", 1, "c1"))
    [(_, fields)] = await redis.xrange(keys.dead)
    assert fields[b"job"] == b"\xffnot json"
    assert fields[b"code"] == b"invalid_job" and fields[b"attempts"] == b"1" and fields[b"consumer"] == b"c1"
    assert int(fields[b"failed_at_ms"]) > 0
    assert decode_reply(await redis.get(keys.result("r2"))) == error
    await publisher.close(timeout_s=5)
