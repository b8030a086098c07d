"""``llm-worker run --processes N``: forked workers, replaced when they die, drained on SIGTERM,
and not restarted forever when they cannot start."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from llm_pool_client import LLMClient
from llm_pool_contracts import Result
from tests.conftest import RedisServer, StandIn
from tests.helpers import marker, user

pytestmark = pytest.mark.slow


def ready_lines(process: Any) -> list[dict[str, Any]]:
    return [line for line in process.log_lines() if line.get("event") == "worker ready"]


async def until_ready(process: Any, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = ready_lines(process)
        if len(lines) >= count:
            return lines
        if process.proc.poll() is not None:
            raise AssertionError("the supervisor exited:\n" + process.log_path.read_text())
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} workers not ready:\n" + process.log_path.read_text())


def child_pids(supervisor_pid: int) -> set[int]:
    from llm_pool_worker.ops import parent_pid

    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and parent_pid(int(entry)) == supervisor_pid}


async def test_a_killed_child_is_replaced_and_the_pool_keeps_serving(spawn_worker: Any, client: LLMClient, settings: Any) -> None:
    from tests.test_ops import llm_worker

    supervisor = spawn_worker(LLM_WORKER_PROCESSES="2")
    await until_ready(supervisor, 2)
    first = child_pids(supervisor.proc.pid)
    assert len(first) == 2 and supervisor.proc.pid not in first
    consumers = {line["consumer"] for line in ready_lines(supervisor)}
    assert len(consumers) == 2, "each child names itself"
    # the container's probe names PID 1, the supervisor: it stands for its workers
    probe = await asyncio.to_thread(llm_worker, settings, "health", "--pid", str(supervisor.proc.pid))
    assert probe.returncode == 0 and all(c in probe.stdout for c in consumers), probe.stderr

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await until_ready(supervisor, 3)
    now = child_pids(supervisor.proc.pid)
    assert len(now) == 2 and victim not in now

    answers = await asyncio.gather(*(client.complete("openai", user(f"job {i}"), tenant_id="t", timeout=30) for i in range(20)))
    assert [a.content for a in answers] == [f"job {i}" for i in range(20)]
    assert supervisor.stop() == 0
    assert child_pids(supervisor.proc.pid) == set()


async def test_sigterm_drains_every_child(spawn_worker: Any, client: LLMClient, standin: StandIn) -> None:
    supervisor = spawn_worker(LLM_WORKER_PROCESSES="2", LLM_WORKER_CONCURRENCY="2")
    await until_ready(supervisor, 2)
    tag = marker()
    jobs = [asyncio.create_task(client.complete("openai", user(f"{tag} {i} #slow=1500"), tenant_id="t", timeout=60)) for i in range(4)]
    while len(standin.calls_with(tag)) < 4:  # both children hold two jobs each
        await asyncio.sleep(0.05)
    children = child_pids(supervisor.proc.pid)
    supervisor.proc.send_signal(signal.SIGTERM)
    for pid in children:  # as systemd's KillMode=control-group does: every process gets the signal too
        os.kill(pid, signal.SIGTERM)
    answers = await asyncio.gather(*jobs)
    assert all(isinstance(a, Result) and a.attempt == 1 for a in answers), "drained, not left to others"
    assert len(standin.calls_with(tag)) == 4, "one model call per job"
    assert await asyncio.to_thread(supervisor.proc.wait, 30) == 0
    assert sum(line.get("event") == "worker stopped" for line in supervisor.log_lines()) == 2


async def test_children_that_cannot_start_are_not_restarted_forever(spawn_worker: Any, redis_server: RedisServer) -> None:
    refused = redis_server.url.replace("redis://", "redis://nobody:wrong@")
    supervisor = spawn_worker(LLM_WORKER_PROCESSES="2", REDIS_URL=refused)
    code = await asyncio.to_thread(supervisor.proc.wait, 60)
    output = supervisor.log_path.read_text()
    assert code == 1
    assert output.count("llm-worker: redis refused the credentials") == 5  # one line per start, no traceback
    assert "Traceback" not in output and "wrong" not in output
    assert any(line.get("event") == "worker processes keep dying at start-up; giving up" for line in supervisor.log_lines())
