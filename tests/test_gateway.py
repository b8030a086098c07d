"""The HTTP gateway as callers use it: the official openai SDK and plain httpx against a gateway
process, with a worker process, the real redis-server and the stand-in model behind it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from llm_pool_contracts import Keys, decode_reply
from llm_pool_gateway.auth import key_hash, new_api_key
from llm_pool_worker.settings import Settings
from scripts.localports import free_port, wait_for_port
from tests.conftest import ROOT, RedisServer, StandIn, WorkerProcess, model_config, worker_env
from tests.helpers import marker

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look a word up",
                                           "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


@dataclass
class Pool:
    url: str
    settings: Settings
    key: str  # tenant "acme", kept in Redis
    config_key: str  # tenant "beta", declared in the config file
    redis: redis.Redis
    standin: StandIn

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.prefix)

    def sdk(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, timeout=30)

    def async_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=30)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key or self.key}"}, timeout=30)

    def stored(self, request_id: str, timeout: float = 15) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            raw = self.redis.get(self.keys.result(request_id))
            if raw is not None:
                return decode_reply(raw)
            time.sleep(0.05)
        raise AssertionError(f"no stored outcome of {request_id}")

    def queued(self) -> int:
        return sum(int(self.redis.xlen(stream)) for stream in self.keys.lanes())


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("gateway")
    config_key = new_api_key()
    config = model_config(standin.url) | {"gateway": {"api_keys": [{"sha256": key_hash(config_key), "tenant": "beta"}]}}
    (workdir / "models.yaml").write_text(yaml.safe_dump(config))
    settings = Settings(redis_url=redis_server.url, config=workdir / "models.yaml", prefix="gw" + uuid.uuid4().hex[:8],
                        heartbeat_s=0.5, block_ms=200, job_timeout_s=30, shutdown_grace_s=5)
    sync_redis = redis.Redis.from_url(redis_server.url)
    key = new_api_key()
    sync_redis.hset(Keys(settings.prefix).api_keys, key_hash(key), "acme")
    worker = WorkerProcess(settings, workdir / "worker.log")
    gateway, url = start_gateway(settings, workdir / "gateway.log")
    try:
        worker.wait_ready()
        yield Pool(url, settings, key, config_key, sync_redis, standin)
    finally:
        worker.stop()
        stop(gateway)
        sync_redis.close()


def start_gateway(settings: Settings, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llm_pool_worker.cli import main; main(sys.argv[1:])", "gateway", "--port", str(port)],
        env=worker_env(settings), stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )
    wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=15)


# ---- OpenAI's API, through the official SDK ----------------------------------------------------

def test_sdk_whole_and_streamed_answers_are_the_models(pool: Pool) -> None:
    sdk = pool.sdk()
    words = f"the gateway relays {marker()}"
    raw = sdk.chat.completions.with_raw_response.create(model="openai", messages=[{"role": "user", "content": words}])
    whole = raw.parse()
    stored = pool.stored(raw.headers["x-request-id"])
    assert whole.choices[0].message.content == stored.content == words  # the stand-in echoes the prompt
    assert whole.model == "openai" and whole.choices[0].finish_reason == "stop"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (stored.usage.prompt_tokens, stored.usage.completion_tokens)
    assert whole.usage.completion_tokens == 4 and whole.usage.total_tokens == whole.usage.prompt_tokens + 4

    chunks = list(sdk.chat.completions.create(model="anthropic", messages=[{"role": "user", "content": "#tokens=30"}],
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"t{i}" for i in range(30))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30


async def test_async_sdk_tool_calls_whole_and_streamed(pool: Pool) -> None:
    sdk = pool.async_sdk()
    messages = [{"role": "user", "content": "find gateways #tool"}]
    whole = await sdk.chat.completions.create(model="openai", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"text": "find gateways"}

    stream = await sdk.chat.completions.create(model="ollama", messages=messages, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    deltas = [c async for c in stream]
    calls = [t for c in deltas for t in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["lookup"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"text": "find gateways"}  # type: ignore[union-attr, arg-type]
    assert deltas[-1].choices[0].finish_reason == "tool_calls"

    # the conversation goes on with the tool's result, in OpenAI's shapes, as the SDK sends them back
    followed = [*messages, whole.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "a gateway is a door"}]
    answer = await sdk.chat.completions.create(model="anthropic", messages=followed, tools=TOOLS)  # type: ignore[arg-type]
    # Anthropic's wire format carries the tool's result as the last user turn, which has no words for the stand-in to echo
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == "ok"
    await sdk.close()


def test_models_are_the_groups(pool: Pool) -> None:
    groups = {m.id for m in pool.sdk().models.list()}
    assert {"openai", "anthropic", "fast", "quality", "broken"} <= groups


def test_no_valid_key_is_401_and_enqueues_nothing(pool: Pool) -> None:
    words = f"never sent {marker()}"
    before = pool.queued()
    for key in ("lpw-not-a-key", pool.key + "x"):
        with pytest.raises(openai.AuthenticationError) as refused:
            pool.sdk(key).chat.completions.create(model="openai", messages=[{"role": "user", "content": words}])
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    answer = httpx.post(pool.url + "/complete", json={"model": "openai", "messages": [{"role": "user", "content": words}]})
    assert answer.status_code == 401 and answer.json()["type"] == "error"
    assert pool.queued() == before and pool.standin.calls_with(words) == []


def test_the_tenant_is_the_keys(pool: Pool) -> None:
    """A key from the config acts for its tenant; a tenant_id in the body changes nothing."""
    body = {"model": "openai", "messages": [{"role": "user", "content": "whose"}], "tenant_id": "intruder"}
    with pool.http(pool.config_key) as http:
        answer = http.post("/complete", json=body)
    assert answer.status_code == 200
    assert pool.stored(answer.headers["x-request-id"]).tenant_id == "beta"


def test_providers_down_is_503_with_the_contract_code(pool: Pool) -> None:
    messages = [{"role": "user", "content": "anyone"}]
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as down:
            pool.sdk().chat.completions.create(model="broken", messages=messages, stream=stream)  # type: ignore[call-overload]
        assert down.value.status_code == 503 and down.value.code == "providers_unavailable"
    with pool.http() as http:
        answer = http.post("/complete/stream", json={"model": "broken", "messages": messages})
    assert answer.status_code == 503 and answer.json()["code"] == "providers_unavailable"


def test_refusals_name_what_is_wrong(pool: Pool) -> None:
    sdk = pool.sdk()
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="no-such-group", messages=[{"role": "user", "content": "x"}])
    assert "no-such-group" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as unsupported:
        sdk.chat.completions.create(model="openai", messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5})
    assert "logit_bias" in unsupported.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        sdk.chat.completions.create(model="openai", messages=[])
    assert "messages" in empty.value.message
    huge = [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.chat.completions.create(model="openai", messages=huge)  # type: ignore[arg-type]
    assert too_large.value.status_code == 413 and too_large.value.code == "request_too_large"
    # what SDKs send by default, at the value that changes nothing, passes
    ok = sdk.chat.completions.create(model="openai", messages=[{"role": "user", "content": "x"}], n=1, presence_penalty=0,
                                     temperature=0.1, max_completion_tokens=5, user="u1")
    assert ok.choices[0].message.content == "x"


# ---- the seed's API ------------------------------------------------------------------------------

def test_seed_endpoints_carry_usage_and_tool_calls(pool: Pool) -> None:
    with pool.http() as http:
        whole = http.post("/complete", json={"model": "fast", "messages": [{"role": "user", "content": "seed says hi"}]}).json()
        assert whole["content"] == "seed says hi" and whole["usage"]["completion_tokens"] == 3
        assert whole["usage"]["prompt_tokens"] > 0 and whole["provider_model"] == "openai/gpt-4o-mini"  # fast's first one fails

        body = {"model": "anthropic", "messages": [{"role": "user", "content": "stream it #tool"}], "tools": TOOLS}
        with http.stream("POST", "/complete/stream", json=body) as streamed:
            assert streamed.headers["content-type"] == "application/x-ndjson"
            lines = [json.loads(line) for line in streamed.iter_lines() if line]
        assert lines[-1]["type"] == "done" and [c["function"]["name"] for c in lines[-1]["tool_calls"]] == ["lookup"]
        assert lines[-1]["usage"]["prompt_tokens"] > 0 and lines[-1]["finish_reason"] == "tool_calls"

        with http.stream("POST", "/complete/stream", json={"model": "openai", "messages": [{"role": "user", "content": "#tokens=12"}]}) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert "".join(line["text"] for line in lines if line["type"] == "chunk") == lines[-1]["content"]
        assert lines[-1]["usage"]["completion_tokens"] == 12

    health = httpx.get(pool.url + "/health")
    assert health.status_code == 200 and health.json()["workers"] >= 1


# ---- callers that leave ----------------------------------------------------------------------------

def test_a_caller_that_hangs_up_cancels_its_job(pool: Pool) -> None:
    words = f"#tokens=200 #slow=50 {marker()}"
    with pool.http() as http, http.stream("POST", "/v1/chat/completions",
                                          json={"model": "openai", "stream": True, "messages": [{"role": "user", "content": words}]}) as s:
        rid = s.headers["x-request-id"]
        for line in s.iter_lines():
            if line.startswith("data:"):
                break  # one event, then hang up
    assert pool.stored(rid).code == "cancelled"
    # a whole answer the caller stopped waiting for is cancelled too (had it run on, its outcome would be the answer)
    words, rid = f"#slow=8000 {marker()}", uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout), pool.http() as http:
        http.post("/complete", json={"model": "openai", "messages": [{"role": "user", "content": words}]},
                  headers={"x-request-id": rid}, timeout=1.5)
    assert pool.stored(rid).code == "cancelled"
    assert len(pool.standin.calls_with(words)) == 1


def test_resumable_stream_reattaches_where_it_left_off(pool: Pool) -> None:
    words = "#tokens=80 #slow=20"
    body = {"model": "openai", "stream": True, "resumable": True, "messages": [{"role": "user", "content": words}]}
    seen: list[str] = []
    last_id = ""
    with pool.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as first:
        rid = first.headers["x-request-id"]
        for line in first.iter_lines():
            if line.startswith("id: "):
                last_id = line[4:]
            elif line.startswith("data: "):
                seen.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                if len(seen) == 10:
                    break  # the caller goes away: the job runs on
    with pool.http(pool.config_key) as other:  # another tenant's key does not see it
        assert other.get(f"/v1/requests/{rid}/stream").status_code == 404
    with pool.http() as http, http.stream("GET", f"/v1/requests/{rid}/stream", params={"after": last_id}) as rest:
        assert rest.status_code == 200
        events = [json.loads(line[6:]) for line in rest.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(seen) + "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    done = pool.stored(rid)
    assert text == done.content == " ".join(f"t{i}" for i in range(80))
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_redis_away_is_503_and_back_serves_again(pool: Pool, redis_server: RedisServer) -> None:
    body = {"model": "openai", "messages": [{"role": "user", "content": "are you there"}]}
    redis_server.stop()
    try:
        with pool.http() as http:
            away = http.post("/complete", json=body)
        assert away.status_code == 503 and away.json()["code"] == "redis_unavailable"
        with pytest.raises(openai.InternalServerError) as down:
            pool.sdk().chat.completions.create(model="openai", messages=body["messages"], stream=True)  # type: ignore[arg-type]
        assert down.value.code == "redis_unavailable"
    finally:
        redis_server.start()
    end = time.monotonic() + 20  # the worker and the gateway reconnect on their own
    while True:
        with pool.http() as http:
            back = http.post("/complete", json=body)
        if back.status_code == 200 or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert back.status_code == 200 and back.json()["content"] == "are you there"
