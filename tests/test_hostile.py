"""Hostile input from either side, at the process level where it matters: a poison job, a provider
(or a proxy) that answers badly, ids that break their rule, a request_id reused by another tenant.
Each test checks that the worker lives on, that healthy jobs beside the bad one are served, that
each job reached the model at most once, and that the orchestrator got a clear error."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Chunk, Done, Error, ErrorCode, Result
from tests.conftest import RunningWorker, StandIn
from tests.helpers import Listener, ghost_takes, marker, user, wait_until

pytestmark = pytest.mark.slow


async def started(spawn: Any, **env: str) -> Any:
    process = spawn(**env)
    await asyncio.to_thread(process.wait_ready)
    return process


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def poison(rid: str, depth: int = 1000) -> bytes:
    """A valid job but for an unknown field nested ``depth`` lists deep (2 KB at 1,000)."""
    body = json.dumps({"request_id": rid, "tenant_id": "t", "model": "openai", "messages": user("x")}).encode()
    return body[:-1] + b', "junk": ' + b"[" * depth + b"]" * depth + b"}"


# ---- the poison job --------------------------------------------------------------------------------


async def test_a_poison_job_is_answered_dead_lettered_and_the_worker_carries_on(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis
) -> None:
    fresh, reclaimed = "poison-" + marker(), "poison-" + marker()
    await ghost_takes(redis, client, poison(reclaimed))  # a dead worker held one: it must be reclaimed and answered too
    async with Listener(redis, f"{client.keys.prefix}:reply:poison-*") as listener:
        process = await started(spawn_worker)
        await redis.xadd(client.keys.jobs, {"job": poison(fresh)})
        await listener.until(lambda r: len(r) == 2)
    assert {e.request_id for e in listener.replies} == {fresh, reclaimed}
    assert all(isinstance(e, Error) and e.code == ErrorCode.INVALID_JOB and "nests" in e.message for e in listener.replies)
    dead = await redis.xrange(client.keys.dead)
    assert sorted(fields[b"job"] for _, fields in dead) == sorted([poison(fresh), poison(reclaimed)])
    assert (await client.complete("ollama", user("still serving"), tenant_id="t", timeout=15)).content == "still serving"
    assert (await redis.xpending(client.keys.jobs, client.keys.group))["pending"] == 0
    assert await asyncio.to_thread(process.stop) == 0, "and it stops cleanly on SIGTERM"


# ---- a provider that answers badly ------------------------------------------------------------------


class LoopLag:
    """How late the event loop runs a 10 ms timer, at worst, while it runs."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - before - 0.01)

    def __enter__(self) -> LoopLag:
        self.task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()


async def outcome_of(client: LLMClient, prompt: str, stream: bool = True) -> Done | Result | Error:
    try:
        if not stream:
            return await client.complete("openai", user(prompt), tenant_id="t", timeout=60)
        async for event in client.stream("openai", user(prompt), tenant_id="t", timeout=60):
            if isinstance(event, Done):
                return event
    except JobFailed as exc:
        return exc.error
    raise AssertionError("no end")


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "litellm"])
@pytest.mark.serial  # measures the event loop's longest stall
async def test_hostile_streams_do_not_stall_healthy_jobs_beside_them(
    lean: bool, settings: Any, router: Any, client: LLMClient, standin: StandIn
) -> None:
    """One huge line without a newline, 100,000 events of padding before the first token, and a
    legitimately long stream of 20,000 events, served beside ten healthy streams."""
    router.lean_streams = lean
    mark = marker()
    hostile = [f"{mark} a b #hugeline=50", f"{mark} a b #padding=100000", f"{mark} #tokens=20000"]
    healthy = [f"{mark} h{i} #tokens=20 #slow=20" for i in range(10)]
    try:
        async with RunningWorker(settings, router):
            with LoopLag() as lag:
                started_at = time.monotonic()
                outcomes = await asyncio.gather(*(outcome_of(client, p) for p in hostile + healthy))
                took = time.monotonic() - started_at
    finally:
        router.lean_streams = True
    huge, padded, long, *fine = outcomes
    assert isinstance(huge, Error) and huge.code == ErrorCode.INTERRUPTED
    assert isinstance(padded, Error) and padded.code == ErrorCode.PROVIDERS_UNAVAILABLE
    assert isinstance(long, Done) and long.usage.completion_tokens == 20000 and len(long.content) > 100_000
    assert all(isinstance(o, Done) and o.usage.completion_tokens == 20 for o in fine)
    assert lag.worst < 0.25, f"the event loop was held for {lag.worst:.3f} s"
    assert took < 20, "nothing waited for a job timeout"
    calls = standin.calls_with(mark)
    for prompt in healthy + hostile[2:]:
        assert sum(c["text"] == prompt for c in calls) == 1, prompt


async def test_an_answer_past_the_size_bound_ends_answer_too_large(client: LLMClient, worker: Any, standin: StandIn) -> None:
    """The test router's bound is 200,000 characters; 40,000 tokens are about 260,000."""
    mark = marker()
    answer = await outcome_of(client, f"{mark} #tokens=40000")
    assert isinstance(answer, Error) and answer.code == ErrorCode.ANSWER_TOO_LARGE and answer.attempt == 1
    assert len(standin.calls_with(mark)) == 1, "not restarted: a second call would be as long"


async def test_a_gzip_bomb_ends_answer_too_large_without_the_memory(
    spawn_worker: Any, client: LLMClient, standin: StandIn
) -> None:
    process = await started(spawn_worker)
    before = rss_mib(process.proc.pid)
    mark = marker()
    with pytest.raises(JobFailed) as caught:
        await client.complete("openai", user(f"{mark} #bomb=200"), tenant_id="t", timeout=60)
    assert caught.value.code == ErrorCode.ANSWER_TOO_LARGE
    assert rss_mib(process.proc.pid) - before < 100, "200 MB inflated were never held"
    assert len(standin.calls_with(mark)) == 1, "the bomb was not asked for again"
    assert (await client.complete("openai", user("after the bomb"), tenant_id="t", timeout=15)).content == "after the bomb"


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "litellm"])
async def test_a_compressed_stream_still_streams(lean: bool, client: LLMClient, worker: Any, router: Any, standin: StandIn) -> None:
    router.lean_streams = lean
    mark = marker()
    try:
        arrivals = []
        async for event in client.stream("openai", user(f"{mark} a b c d e f g h i j #gzip #slow=100"), tenant_id="t", timeout=30):
            arrivals.append((time.time(), event))
    finally:
        router.lean_streams = True
    first_chunk_at = next(at for at, e in arrivals if isinstance(e, Chunk))
    [call] = standin.calls_with(mark)
    for _ in range(50):  # the stand-in notes the end just after its last write
        if "ended" in call:
            break
        await asyncio.sleep(0.05)
        [call] = standin.calls_with(mark)
    assert first_chunk_at < call["ended"] - 0.5, "the first token arrived while the provider was still sending"
    assert isinstance(arrivals[-1][1], Done) and arrivals[-1][1].content.endswith("a b c d e f g h i j")


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "litellm"])
@pytest.mark.parametrize("kind", ["negusage", "strusage"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_usage_that_is_not_believable_is_estimated(
    lean: bool, kind: str, stream: bool, client: LLMClient, worker: Any, router: Any, standin: StandIn
) -> None:
    router.lean_streams = lean
    mark = marker()
    try:
        answer = await outcome_of(client, f"{mark} a b c #{kind}", stream=stream)
    finally:
        router.lean_streams = True
    assert isinstance(answer, Done | Result) and answer.content.endswith("a b c"), answer
    assert answer.usage.estimated and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.cost_usd is not None and answer.cost_usd >= 0
    assert answer.attempt == 1 and len(standin.calls_with(mark)) == 1, "a bookkeeping field costs no second call"


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "litellm"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_html_instead_of_an_answer_fails_the_deployment(
    lean: bool, stream: bool, client: LLMClient, worker: Any, router: Any
) -> None:
    router.lean_streams = lean
    try:
        alone = await outcome_of(client, "a b c #html", stream=stream)
        kwargs: dict[str, Any] = {"tenant_id": "t", "timeout": 30}
        if stream:
            events = [e async for e in client.stream("html-first", user("a b c"), **kwargs)]
            answered: Any = events[-1]
        else:
            answered = await client.complete("html-first", user("a b c"), **kwargs)
    finally:
        router.lean_streams = True
    assert isinstance(alone, Error) and alone.code == ErrorCode.PROVIDERS_UNAVAILABLE, "not an empty success"
    assert answered.content == "a b c" and answered.provider_model == "openai/gpt-4o-mini", "the next deployment answered"


@pytest.mark.parametrize(("group", "code"), [("bad-key", ErrorCode.PROVIDER_AUTH), ("limited", ErrorCode.RATE_LIMITED)])
async def test_a_bad_key_and_a_rate_limit_are_told_apart(group: str, code: ErrorCode, client: LLMClient, worker: Any) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.complete(group, user("x"), tenant_id="t", timeout=30)
    assert caught.value.code == code


# ---- bad input from the orchestrator ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "why"),
    [({"messages": [{"role": "user", "content": 5}]}, "content"), ({"tools": [{"foo": 1}]}, "tools[0]"),
     ({"tools": [{"type": "function"}]}, "tools[0]")],
)
async def test_content_and_tools_litellm_cannot_use_are_invalid_jobs(
    change: dict[str, Any], why: str, client: LLMClient, worker: Any, redis: aioredis.Redis, standin: StandIn
) -> None:
    """litellm fails on these before any call, as a connection error that cools healthy deployments
    down; the contract refuses them first (they were `providers_unavailable (HTTP 500)`)."""
    mark = marker()
    raw = json.dumps({"request_id": mark, "tenant_id": "t", "model": "openai", "messages": user(mark), **change}).encode()
    [error] = await send_raw(redis, client, raw, mark)
    assert isinstance(error, Error) and error.code == ErrorCode.INVALID_JOB and why in error.message
    assert standin.calls_with(mark) == []


async def send_raw(redis: aioredis.Redis, client: LLMClient, raw: bytes, rid: str) -> list[Any]:
    async with Listener(redis, client.keys.reply(rid)) as listener:
        await redis.xadd(client.keys.jobs, {"job": raw})
        return await listener.until(lambda r: len(r) >= 1, timeout=10)


@pytest.mark.parametrize(
    ("damage", "why"),
    [(lambda b: b.replace(b'"hello"', b'"\xff\xfe"'), "not valid UTF-8"), (lambda b: b"\xef\xbb\xbf" + b, "byte order mark"),
     (lambda b: b.replace(b'"hello"', b'"\\ud800"'), "surrogate")],
    ids=["non-utf8", "bom", "lone-surrogate"],
)
async def test_undecodable_jobs_with_a_readable_id_are_answered_truly(
    damage: Any, why: str, client: LLMClient, worker: Any, redis: aioredis.Redis
) -> None:
    rid = "odd-" + marker()
    raw = damage(json.dumps({"request_id": rid, "tenant_id": "t", "model": "openai", "messages": user("hello")}).encode())
    [error] = await send_raw(redis, client, raw, rid)
    assert isinstance(error, Error) and error.code == ErrorCode.INVALID_JOB and why in error.message
    assert "truncated" not in error.message


@pytest.mark.parametrize("field", ["request_id", "tenant_id"])
async def test_an_id_with_a_trailing_newline_is_refused(field: str, client: LLMClient, worker: Any, redis: aioredis.Redis) -> None:
    rid = "nl-" + marker()
    job = {"request_id": rid, "tenant_id": "t", "model": "openai", "messages": user("x"), field: (rid if field == "request_id" else "t") + "\n"}
    async with Listener(redis, f"{client.keys.prefix}:reply:{rid}*") as listener:
        await redis.xadd(client.keys.jobs, {"job": json.dumps(job).encode()})
        await wait_until(lambda: _dead_letters(redis, client, 1), 10, "the dead letter")
        if field == "tenant_id":
            await listener.until(lambda r: len(r) >= 1)
        await asyncio.sleep(0.3)
        await listener.until(lambda r: True)
    channels = {e.request_id for e in listener.replies}
    assert "\n" not in "".join(channels), "nothing was published on a channel whose name ends in a newline"
    if field == "tenant_id":
        [error] = listener.replies
        assert error.code == ErrorCode.INVALID_JOB and "tenant_id" in error.message


async def _dead_letters(redis: aioredis.Redis, client: LLMClient, n: int) -> bool:
    return int(await redis.xlen(client.keys.dead)) >= n


async def test_a_request_id_reused_by_another_tenant_is_refused_and_the_answer_stays_private(
    client: LLMClient, worker: Any, standin: StandIn
) -> None:
    mark = marker()
    rid = "shared-" + mark
    first = await client.complete("openai", user(f"{mark} secret answer"), tenant_id="acme", request_id=rid, timeout=10)
    with pytest.raises(JobFailed) as caught:
        await client.complete("openai", user(mark), tenant_id="globex", request_id=rid, timeout=10)
    assert caught.value.code == ErrorCode.INVALID_JOB and "another tenant" in caught.value.message
    assert "secret" not in caught.value.message
    assert await client.stored_outcome(rid) == first, "the stored answer is still acme's"
    assert len(standin.calls_with(mark)) == 1
    again = await client.complete("openai", user(mark), tenant_id="acme", request_id=rid, timeout=10)
    assert again == first, "its own tenant still gets it"


# ---- TLS settings reach the provider transport -----------------------------------------------------


def private_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate for 127.0.0.1 that it signed."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=llm-pool test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
        "-days", "2", "-extfile", "ext.cnf")
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


async def test_a_private_ca_in_litellm_settings_reaches_every_path(
    tmp_path: Path, spawn_worker: Any, client: LLMClient
) -> None:
    import sys

    from scripts.localports import free_port, wait_for_port
    from tests.conftest import STANDIN

    ca, cert, key = private_ca(tmp_path)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        wait_for_port(port)
        base = {"model": "openai/gpt-4o-mini", "api_base": f"https://127.0.0.1:{port}/v1", "api_key": "sk-test"}
        config = tmp_path / "tls.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": "tls", "litellm_params": base}],
            "router_settings": {"num_retries": 0, "timeout": 5},
            "litellm_settings": {"ssl_verify": str(ca)},
        }))
        await started(spawn_worker, LLM_WORKER_CONFIG=str(config))
        whole = await client.complete("tls", user("over tls"), tenant_id="t", timeout=30)
        streamed = [e async for e in client.stream("tls", user("streamed over tls"), tenant_id="t", timeout=30)]
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert whole.content == "over tls"
    assert isinstance(streamed[-1], Done) and streamed[-1].content == "streamed over tls"
