"""The pool behind a Redis that asks who is calling: an ACL user limited to the prefix, a password, TLS.

The ACL user is made from the README's command lists (``llm-worker acl``), so that a worker, a
client and the operator's commands running under it prove those lists complete, and a user
without one of them proves the start-up check finds it.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from llm_pool_client import JobFailed, LLMClient
from llm_pool_contracts import Done, ErrorCode, Job, Keys, Result
from llm_pool_worker.permissions import WORKER_COMMANDS, AccessRefused, acl_setuser, check_worker_access
from scripts.localports import free_port, wait_for_port
from tests.conftest import RedisServer, RunningWorker, StandIn
from tests.helpers import ghost_takes, marker, user, wait_until
from tests.test_hostile import private_ca
from tests.test_ops import llm_worker

PASSWORD = "s3cret-pool-pw"


async def make_user(admin: aioredis.Redis, server_url: str, prefix: str, roles: tuple[str, ...], without: str = "") -> str:
    """An ACL user set up with ``llm-worker acl``'s line, less one command; returns its URL."""
    name = f"pool-{prefix}-{without.replace('|', '-') or 'all'}"
    rules = shlex.split(acl_setuser(prefix, name, roles).replace(">CHANGE-ME", ">" + PASSWORD))
    await admin.execute_command(*[r for r in rules if r != "+" + without])
    return server_url.replace("redis://", f"redis://{name}:{PASSWORD}@")


@pytest.fixture
async def admin(redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    before = set(await redis.acl_users())
    await redis.acl_log_reset()
    yield redis
    for name in set(await redis.acl_users()) - before:
        await redis.acl_deluser(name)


async def test_worker_client_and_operator_need_only_the_listed_commands(
    admin: aioredis.Redis, redis_server: RedisServer, settings: Any, spawn_worker: Any, standin: StandIn, prefix: str
) -> None:
    url = await make_user(admin, redis_server.url, prefix, ("worker", "client", "operator"))
    limited = settings.model_copy(update={"redis_url": SecretStr(url)})
    mark = marker()
    async with LLMClient.from_url(url, prefix=prefix) as client:
        await client.ensure_group()
        # left by workers that died: one to reclaim, one delivered too often, for the dead-letter stream
        orphan = Job(request_id="orphan-" + mark, tenant_id="acme", model="openai", messages=user(f"{mark} orphan"))
        await ghost_takes(admin, client, orphan)
        poison = Job(request_id="poison-" + mark, tenant_id="acme", model="openai", messages=user(f"{mark} poison"))
        entry = await ghost_takes(admin, client, poison)
        for ghost in ("ghost-2-dead", "ghost-3-dead"):
            await admin.xclaim(client.keys.jobs, client.keys.group, ghost, 0, [entry])
        worker = spawn_worker(REDIS_URL=url)  # a process: litellm's router state goes through Redis too
        await asyncio.to_thread(worker.wait_ready)
        whole = await client.complete("ledger", user(f"{mark} whole"), tenant_id="acme", timeout=30)
        await client.complete("fast", user(f"{mark} cools one down"), tenant_id="acme", timeout=30)
        streamed = [e async for e in client.stream("openai", user(f"{mark} streamed"), tenant_id="acme", timeout=30)]
        with pytest.raises(JobFailed) as cancelled:
            async for _ in client.stream("openai", user(f"{mark} #tokens=100 #slow=50"), tenant_id="acme",
                                         request_id="cancel-" + mark, timeout=30):
                await client.cancel("cancel-" + mark)
        await wait_until(lambda: client.stored_outcome(orphan.request_id), 20, "the orphan answered")
        await wait_until(lambda: client.stored_outcome(poison.request_id), 20, "the poison dead-lettered")
        reclaimed = await client.stored_outcome(orphan.request_id)
        operator = {command: await asyncio.to_thread(llm_worker, limited, *command.split())
                    for command in ("status --json", "health", "usage --json", "dead list --json", "dead replay --all")}
        await wait_until(lambda: _answered(client, poison.request_id), 20, "the replayed job answered")
        await admin.xadd(client.keys.jobs, {"job": b"not json"})  # nobody to answer, no tenant, no ledger: dead-lettered
        try:
            await wait_until(lambda: _dead_letters(admin, client, 1), 20, "the unreadable job dead-lettered")
        except AssertionError as exc:  # what the dead-letter stream held instead, for a failure that is rare
            raise AssertionError(f"{exc}: {await admin.xrange(client.keys.dead)}") from None
        ledger = await client.usage(tenant_id="acme")
    assert whole.content == f"{mark} whole" and isinstance(streamed[-1], Done)
    assert cancelled.value.code == ErrorCode.CANCELLED
    assert isinstance(reclaimed, Result) and reclaimed.attempt > 1, "a dead worker's job was reclaimed"
    assert len(standin.calls_with(f"{mark} orphan")) == 1
    for command, done in operator.items():
        assert done.returncode == 0, (command, done.stderr)
    assert json.loads(operator["status --json"].stdout)["queue"]["dead_letters"] == 1
    assert "too_many_attempts" in operator["dead list --json"].stdout
    assert any(row.requests for row in ledger)
    refusals = [(r["object"], r["reason"]) for r in await admin.acl_log()]
    assert refusals == [], f"every command the pool ran is in the README's lists: {refusals}"
    assert await admin.keys(f"{prefix}:router:*"), "the router kept its state in Redis, under the prefix"


async def _dead_letters(admin: aioredis.Redis, client: LLMClient, count: int) -> bool:
    return int(await admin.xlen(client.keys.dead)) == count


async def _answered(client: LLMClient, request_id: str) -> bool:
    return isinstance(await client.stored_outcome(request_id), Result)


@pytest.mark.parametrize("command", [*WORKER_COMMANDS])
async def test_the_start_up_check_names_each_missing_command(
    command: str, admin: aioredis.Redis, redis_server: RedisServer, prefix: str
) -> None:
    url = await make_user(admin, redis_server.url, prefix, ("worker",), without=command)
    limited = aioredis.Redis.from_url(url)
    try:
        with pytest.raises(AccessRefused) as refused:
            await check_worker_access(limited, Keys(prefix), "probe-consumer")
    finally:
        await limited.aclose()
    assert f"may not run {command.upper()} on {prefix}:*" in str(refused.value)
    assert await admin.keys(f"{prefix}:*") == [], "the check wrote nothing"
    assert len(await admin.acl_log()) == (1 if command in ("script|load", "evalsha") else 0), "and ran nothing it may not"


async def test_the_start_up_check_passes_a_full_user_and_leaves_no_trace(
    admin: aioredis.Redis, redis_server: RedisServer, prefix: str, client: LLMClient
) -> None:
    url = await make_user(admin, redis_server.url, prefix, ("worker",))
    await client.ensure_group()
    before = {key: await admin.type(key) for key in await admin.keys(f"{prefix}:*")}
    groups = await admin.xinfo_groups(client.keys.jobs)
    limited = aioredis.Redis.from_url(url)
    try:
        await check_worker_access(limited, client.keys, "probe-consumer")
    finally:
        await limited.aclose()
    assert {key: await admin.type(key) for key in await admin.keys(f"{prefix}:*")} == before
    assert await admin.xinfo_groups(client.keys.jobs) == groups
    assert await admin.xinfo_consumers(client.keys.jobs, client.keys.group) == [], "no consumer was made"
    assert await admin.acl_log() == []


async def test_a_worker_without_a_permission_stops_at_start_up_in_one_line(
    admin: aioredis.Redis, redis_server: RedisServer, settings: Any, spawn_worker: Any
) -> None:
    url = await make_user(admin, redis_server.url, settings.prefix, ("worker",), without="xclaim")
    process = spawn_worker(REDIS_URL=url)
    code = await asyncio.to_thread(process.proc.wait, 60)
    output = process.log_path.read_text()
    errors = [line for line in output.splitlines() if line.startswith("llm-worker:")]
    assert code == 2 and errors == [f"llm-worker: the redis user may not run XCLAIM on {settings.prefix}:* (README: Redis permissions)"]
    assert "Traceback" not in output and PASSWORD not in output


async def test_a_wrong_password_stops_the_worker_in_one_line(
    admin: aioredis.Redis, redis_server: RedisServer, settings: Any, spawn_worker: Any
) -> None:
    url = await make_user(admin, redis_server.url, settings.prefix, ("worker",))
    process = spawn_worker(REDIS_URL=url.replace(PASSWORD, PASSWORD + "-old"))
    code = await asyncio.to_thread(process.proc.wait, 60)
    output = process.log_path.read_text()
    errors = [line for line in output.splitlines() if line.startswith("llm-worker:")]
    assert code == 2 and len(errors) == 1 and "refused the credentials" in errors[0]
    assert "Traceback" not in output and PASSWORD not in output


# ---- a password on the default user, and TLS ------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Any:
    """A redis-server of its own that takes only TLS (a private CA) and asks for a password."""
    ca, cert, key = private_ca(tmp_path)
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
         "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    yield f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    proc.terminate()
    proc.wait(timeout=10)


async def test_worker_and_client_over_tls_with_a_password(tls_redis: str, settings: Any, router: Any, prefix: str) -> None:
    secured = settings.model_copy(update={"redis_url": SecretStr(tls_redis)})
    async with LLMClient.from_url(tls_redis, prefix=prefix) as client, RunningWorker(secured, router):
        whole = await client.complete("openai", user("over tls"), tenant_id="t", timeout=30)
        streamed = [e async for e in client.stream("openai", user("streamed over tls"), tenant_id="t", timeout=30)]
    assert whole.content == "over tls"
    assert isinstance(streamed[-1], Done) and streamed[-1].content == "streamed over tls"
    unverified = tls_redis.split("?", maxsplit=1)[0]
    async with LLMClient.from_url(unverified, prefix=prefix) as stranger:
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await stranger.ensure_group()


def test_the_readme_lists_the_commands_each_part_runs() -> None:
    from llm_pool_worker.permissions import ROLES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- commands:", 1)[1].split("\n\n", 1)[0]
    listed = {}
    for row in table.splitlines()[3:]:
        who, commands = (cell.strip() for cell in row.strip("|").split("| ", 1))
        listed[who.split()[0]] = tuple(commands.strip("` |").replace("\\|", "|").split())
    assert listed == ROLES
