"""Real parts for the tests: a private redis-server, the stand-in model over HTTP, workers.

Each test gets its own key prefix, so tests share one Redis without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from llm_pool_client import LLMClient
from llm_pool_worker.settings import Settings
from scripts.localports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "scripts" / "standin_model.py"


@dataclass
class RedisServer:
    """A redis-server of the test session's own, which tests may stop and start again."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class StandIn:
    """The stand-in model process and its call log."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/_calls", timeout=5) as resp:
            return list(json.load(resp))

    def calls_with(self, marker: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if marker in (c.get("text") or "")]


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(port)])
    wait_for_port(port)
    yield StandIn(port)
    proc.terminate()
    proc.wait(timeout=10)


def model_config(standin_url: str) -> dict[str, Any]:
    """Groups for the tests: one per provider format, and groups that fail in known ways."""
    v1 = standin_url + "/v1"

    def dep(group: str, model: str, order: int = 1, **extra: Any) -> dict[str, Any]:
        base = v1 if model.startswith("openai/") else standin_url
        params: dict[str, Any] = {"model": model, "api_base": base, "order": order, **extra}
        if not model.startswith("ollama"):
            params.setdefault("api_key", "sk-test-not-a-real-key")
        return {"model_name": group, "litellm_params": params}

    return {
        "model_list": [
            dep("openai", "openai/gpt-4o-mini"),
            dep("anthropic", "anthropic/claude-sonnet-4-5"),
            dep("ollama", "ollama_chat/llama3.2"),
            # within a group: the first deployment fails, the second answers
            dep("fast", "ollama_chat/fail-503", 1),
            dep("fast", "openai/gpt-4o-mini", 2),
            # across groups: quality's only deployment fails, the fallback group answers
            dep("quality", "anthropic/fail-529"),
            # nothing answers
            dep("broken", "openai/fail-500", 1),
            dep("broken", "anthropic/fail-503", 2),
            dep("rejects", "openai/fail-400"),
            dep("unpriced", "openai/stand-in-unmapped"),
            dep("custom-priced", "openai/stand-in-priced", input_cost_per_token=1e-6, output_cost_per_token=2e-6),
            dep("hangs", "openai/hang", timeout=1, stream_timeout=1),
            # streams that break after two tokens; the second deployment is sound
            dep("flaky", "openai/drop-2", 1),
            dep("flaky", "openai/gpt-4o-mini", 2),
            dep("always-breaks", "openai/drop-2"),
            # like flaky, for tests that need the restart in a fresh worker process (cooldowns are per process)
            dep("restarts", "openai/drop-3", 1),
            dep("restarts", "openai/gpt-4o-mini", 2),
            dep("stalls", "openai/stall-2", stream_timeout=1),
            dep("keyless", "openai/gpt-4o-mini", api_key="os.environ/LLM_POOL_TEST_UNSET_KEY"),
            # a proxy answering 200 with an HTML page, in front of the first deployment only
            dep("html-first", "openai/html", 1),
            dep("html-first", "openai/gpt-4o-mini", 2),
            dep("bad-key", "openai/fail-401"),
            # prices that make the ledger's sums easy to check to the cent
            dep("ledger", "openai/stand-in-ledger", input_cost_per_token=0.001, output_cost_per_token=0.002),
            dep("limited", "openai/fail-429"),
        ],
        "router_settings": {
            "num_retries": 1,
            "timeout": 5,
            "stream_timeout": 5,
            "retry_after": 0,
            "allowed_fails": 0,
            "cooldown_time": 5,
            "fallbacks": [{"quality": ["fast"]}, {"keyless": ["openai"]}],
        },
    }


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, standin: StandIn) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(yaml.safe_dump(model_config(standin.url)))
    return path


@pytest.fixture(scope="session")
async def router(config_path: Path) -> Any:
    from llm_pool_worker.model_config import load_model_config
    from llm_pool_worker.router import ModelRouter
    from llm_pool_worker.transport import Limits

    model_router = ModelRouter(load_model_config(config_path), limits=Limits(answer_chars=200_000))
    await model_router.warm_up()
    return model_router


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def settings(redis_server: RedisServer, config_path: Path, prefix: str) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        config=config_path,
        prefix=prefix,
        concurrency=16,
        heartbeat_s=0.5,
        block_ms=200,
        job_timeout_s=20,
        shutdown_grace_s=5,
    )


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def client(redis_server: RedisServer, prefix: str) -> AsyncIterator[LLMClient]:
    async with LLMClient.from_url(redis_server.url, prefix=prefix) as c:
        await c.ensure_group()
        yield c


class RunningWorker:
    """A Worker running as a task of the test's event loop."""

    def __init__(self, settings: Settings, router: Any) -> None:
        from llm_pool_worker.service import Worker

        self.worker = Worker(settings, router)
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> RunningWorker:
        async def ready() -> None:
            self.ready.set()

        self.task = asyncio.create_task(self.worker.run(ready))
        waiting = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait([waiting, self.task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.is_set():
            waiting.cancel()
            if self.task.done():
                self.task.result()  # the worker's own error, rather than a timeout
            raise TimeoutError("worker not ready after 10 s")
        return self

    async def stop(self) -> None:
        self.worker.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    async def __aenter__(self) -> RunningWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def worker(settings: Settings, router: Any, client: LLMClient) -> AsyncIterator[RunningWorker]:
    running = await RunningWorker(settings, router).start()
    yield running
    await running.stop()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=settings.redis_url.get_secret_value(),
        LLM_WORKER_CONFIG=str(settings.config),
        LLM_WORKER_PREFIX=settings.prefix,
        LLM_WORKER_HEARTBEAT_S=str(settings.heartbeat_s),
        LLM_WORKER_BLOCK_MS=str(settings.block_ms),
        LLM_WORKER_SHUTDOWN_GRACE_S=str(settings.shutdown_grace_s),
        LLM_WORKER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m llm_pool_worker`` as its own process, for tests that signal or kill it."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_pool_worker"], env=worker_env(settings, **env), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if b"worker ready" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + self.log_path.read_text())
            time.sleep(0.05)
        raise RuntimeError("worker not ready:\n" + self.log_path.read_text())

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code


@pytest.fixture
def spawn_worker(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def spawn(**env: str) -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", **env)
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
