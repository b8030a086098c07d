"""A randomized soak: jobs flow into both lanes while faults strike at random, then invariants.

One seed fixes the whole run: which jobs, which faults, when. CI runs it briefly with a fresh
seed (printed, so a failure can be replayed); a long manual run uses the same test:

    LLM_POOL_SOAK_SECONDS=600 LLM_POOL_SOAK_SEED=42 .venv/bin/pytest tests/test_soak.py -s

Faults: kill -9 of a worker (a new one takes its place), a worker paused past its lease
(SIGSTOP, then SIGCONT), every connection dropped (CLIENT KILL), a Redis restart (AOF), Redis
out of memory for a moment. Invariants at the end, as a user would count them: every job that
was enqueued has exactly one stored outcome, none of them `internal`; no entry is left pending
in either lane; no job called the model more often than its attempts allow; and the usage
ledger counted each stored outcome once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from llm_pool_client import LLMClient
from llm_pool_contracts import LANES, Error, Job, decode_reply
from tests.conftest import RedisServer, StandIn
from tests.helpers import user

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("LLM_POOL_SOAK_SECONDS", "15"))
SEED = int(os.environ.get("LLM_POOL_SOAK_SEED", str(random.randrange(1_000_000))))
REDIS_FAULTS = (ConnectionError, OSError, aioredis.RedisError)
# group → most provider calls one delivery may make (flaky: a stream breaks and starts again; hangs: a
# provider that never answers, tried twice)
GROUPS = {"openai": 1, "ollama": 1, "flaky": 2, "rejects": 1, "ledger": 1, "hangs": 2}


@dataclass
class Soak:
    jobs_rng: random.Random  # one generator per side, so that a seed replays the same jobs and faults
    faults_rng: random.Random
    client: LLMClient
    admin: aioredis.Redis
    server: RedisServer
    spawn: Any
    workers: list[Any]
    enqueued: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)  # the enqueue's reply was lost: it may have been added
    groups: dict[str, str] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)

    async def produce(self, until: float, tag: str) -> None:
        i = 0
        while time.monotonic() < until:
            i += 1
            [group] = self.jobs_rng.choices(list(GROUPS), weights=[6, 3, 3, 2, 2, 1])  # hangs are rare: 2 s each
            job = Job(request_id=f"{tag}-{i}", tenant_id=f"soak{self.jobs_rng.randrange(4)}", model=group, stream=self.jobs_rng.random() < 0.6,
                      messages=user(f"{tag}-{i}. #tokens={self.jobs_rng.randint(3, 30)} #slow={self.jobs_rng.choice((0, 20, 60))}"))
            self.groups[job.request_id] = group
            try:
                await self.client.enqueue(job, priority="batch" if self.jobs_rng.random() < 0.25 else "interactive")
                self.enqueued.add(job.request_id)
            except REDIS_FAULTS:
                self.maybe.add(job.request_id)
                await asyncio.sleep(0.1)
            await asyncio.sleep(self.jobs_rng.uniform(0.0, 0.06))

    async def strike(self, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(self.faults_rng.uniform(1.0, 3.0))
            fault = self.faults_rng.choice((self.kill, self.pause, self.drop_connections, self.restart_redis, self.out_of_memory))
            self.faults[fault.__name__] += 1
            with contextlib.suppress(*REDIS_FAULTS):
                await fault()

    async def kill(self) -> None:
        live = [w for w in self.workers if w.proc.poll() is None]
        if live:
            self.faults_rng.choice(live).proc.kill()
        self.workers.append(self.spawn())

    async def pause(self) -> None:
        live = [w for w in self.workers if w.proc.poll() is None]
        if live:
            victim = self.faults_rng.choice(live)
            victim.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2.5)  # past the lease (3 heartbeats of 0.5 s): its jobs are taken over
            victim.proc.send_signal(signal.SIGCONT)

    async def drop_connections(self) -> None:
        await self.admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await self.admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    async def restart_redis(self) -> None:
        await asyncio.to_thread(self.server.stop)
        await asyncio.sleep(self.faults_rng.uniform(0.2, 1.5))
        await asyncio.to_thread(self.server.start)

    async def out_of_memory(self) -> None:
        used = int((await self.admin.info("memory"))["used_memory"])
        await self.admin.config_set("maxmemory", used + 256 * 1024)
        try:
            await asyncio.sleep(self.faults_rng.uniform(0.5, 2.0))
        finally:
            await self.admin.config_set("maxmemory", 0)


async def test_soak_faults_at_random_lose_no_job(
    spawn_worker: Any, client: LLMClient, redis: aioredis.Redis, redis_server: RedisServer, standin: StandIn, prefix: str,
    config_path: Path, tmp_path: Path,
) -> None:
    fair = SEED % 2 == 1  # odd seeds run the tenants' waiting room, even ones the plain lanes
    print(f"soak seed {SEED}, {SECONDS:g} s, {'waiting room' if fair else 'plain lanes'} (replay: LLM_POOL_SOAK_SEED={SEED})")
    env = {"LLM_WORKER_CONCURRENCY": "8"}
    if fair:
        config = yaml.safe_load(config_path.read_text())
        config["tenants"] = {"default": {"max_in_flight": 8}, "soak0": {"max_in_flight": 3}}
        (tmp_path / "fair.yaml").write_text(yaml.safe_dump(config))
        env["LLM_WORKER_CONFIG"] = str(tmp_path / "fair.yaml")
    spawn = lambda: spawn_worker(**env)  # noqa: E731
    workers = [spawn() for _ in range(3)]
    for process in workers:
        await asyncio.to_thread(process.wait_ready)
    soak = Soak(random.Random(f"{SEED}-jobs"), random.Random(f"{SEED}-faults"), client, redis, redis_server, spawn, workers)
    until = time.monotonic() + SECONDS
    tag = f"soak{SEED}{prefix}"
    await asyncio.gather(soak.produce(until, tag), soak.strike(until))
    print("faults:", dict(soak.faults), "jobs:", len(soak.enqueued))

    await settle(soak, redis, client)
    await check_invariants(soak, redis, client, standin, tag)
    for process in soak.workers:
        if process.proc.poll() is None:
            assert await asyncio.to_thread(process.stop) == 0


async def settle(soak: Soak, redis: aioredis.Redis, client: LLMClient, stall_s: float = 30.0) -> None:
    """Wait until every enqueued job is answered and acknowledged; fail only when that stops
    moving for ``stall_s`` (a long run leaves a backlog that takes its time)."""
    ids = sorted(soak.enqueued)
    best, moved = -1, time.monotonic()
    while True:
        with contextlib.suppress(*REDIS_FAULTS):
            stored = await redis.mget([client.keys.result(r) for r in ids])
            streams = [*client.keys.lanes(), *(client.keys.run(lane) for lane in LANES)]
            pending = [int((await redis.xpending(s, client.keys.group))["pending"]) for s in streams]
            backlog = [int(await redis.xlen(s)) for s in streams]
            waiting = await redis.keys(f"{client.keys.prefix}:wait:*")
            answered = sum(v is not None for v in stored)
            if answered == len(ids) and not any(pending) and not waiting:
                return
            if answered > best:
                best, moved = answered, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                missing = [r for r, v in zip(ids, stored, strict=True) if v is None]
                raise AssertionError(f"stuck: {len(missing)} jobs unanswered (e.g. {missing[:5]}), "
                                     f"pending {pending}, stream lengths {backlog}, waiting {len(waiting)}")
        await asyncio.sleep(0.5)


async def after_faults(read: Any) -> Any:
    """A read that may first meet a connection the faults left dead (the pool opens a new one)."""
    for _ in range(10):
        with contextlib.suppress(*REDIS_FAULTS):
            return await read()
        await asyncio.sleep(0.2)
    return await read()


async def check_invariants(soak: Soak, redis: aioredis.Redis, client: LLMClient, standin: StandIn, tag: str) -> None:
    ids = sorted(soak.enqueued | soak.maybe)
    values = await after_faults(lambda: redis.mget([client.keys.result(r) for r in ids]))
    stored = {r: decode_reply(v) for r, v in zip(ids, values, strict=True) if v is not None}
    assert soak.enqueued <= stored.keys(), "no enqueued job is lost"
    errors = Counter(o.code for o in stored.values() if isinstance(o, Error))
    assert errors["internal"] == 0, errors
    calls = Counter(c["text"].split(".")[0] for c in standin.calls() if (c.get("text") or "").startswith(tag + "-"))
    for request_id, count in calls.items():
        assert count <= GROUPS[soak.groups[request_id]] * 3, (request_id, count)  # three deliveries at most
    ledger = sum(row.requests for row in await after_faults(client.usage))
    assert ledger == len(stored), "each stored outcome counted once in the ledger"
