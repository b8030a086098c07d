"""Benchmark: the worker pool against bare litellm Router calls, in one run, as ratios.

Starts a private redis-server and the stand-in model (instant answers), then measures:

* baseline: bare ``Router.acompletion`` in this process at concurrency C, stream and not;
* the same jobs through Redis and worker processes (closed loop: C jobs always in flight);
* tokens/s on 200-token streams, added time to first token, scale-out over worker processes,
  RSS per in-flight stream, and start-up time to the first job served.

Replies are read by a bare RESP subscriber (hiredis), so that the measuring side costs little.
Prints a table, writes JSON (and a PNG with --plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import hiredis
import msgspec
import redis.asyncio as aioredis
import yaml
from localports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the measuring side: a bare subscriber --------------------------------------------------


class _Reply(msgspec.Struct):
    type: str
    request_id: str
    text: str = ""


_decode = msgspec.json.Decoder(_Reply).decode


@dataclass
class Pending:
    sent: float
    first: float | None = None
    done: asyncio.Future[float] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    chunks: int = 0
    kind: str = ""


class Subscriber:
    """PSUBSCRIBE on a raw socket: a few microseconds per message."""

    def __init__(self, port: int, pattern: str) -> None:
        self.port = port
        self.pattern = pattern
        self.waiting: dict[str, Pending] = {}
        self.messages = 0

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"*2\r\n$10\r\nPSUBSCRIBE\r\n${len(self.pattern)}\r\n{self.pattern}\r\n".encode())
        await self.writer.drain()
        self.parser = hiredis.Reader()
        self.parser.feed(await self.reader.read(65536))
        assert self.parser.gets()[0] == b"psubscribe"
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        parser, waiting = self.parser, self.waiting
        while True:
            data = await self.reader.read(1 << 20)
            if not data:
                return
            parser.feed(data)
            now = time.perf_counter()
            while (item := parser.gets()) is not False:
                self.messages += 1
                reply = _decode(item[3])
                pending = waiting.get(reply.request_id)
                if pending is None:
                    continue
                if reply.type == "chunk":
                    pending.chunks += 1
                    if pending.first is None:
                        pending.first = now
                else:
                    pending.kind = reply.type
                    if pending.first is None:
                        pending.first = now
                    pending.done.set_result(now)

    async def stop(self) -> None:
        self.task.cancel()
        self.writer.close()


# ---- environment ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="llm-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Bench:
        self.redis_port = free_port()
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.procs.append(subprocess.Popen(
            [redis_bin, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL))
        self.model_port = free_port()
        self.procs.append(subprocess.Popen(
            [PY, str(ROOT / "scripts" / "standin_model.py"), "--port", str(self.model_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(self.redis_port)
        wait_for_port(self.model_port)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.config = self.tmp / "models.yaml"
        base = f"http://127.0.0.1:{self.model_port}"
        self.config.write_text(yaml.safe_dump({
            "model_list": [
                {"model_name": "bench", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": base + "/v1", "api_key": "sk-bench"}},
                {"model_name": "bench-anthropic", "litellm_params": {"model": "anthropic/claude-sonnet-4-5", "api_base": base, "api_key": "sk-bench"}},
                {"model_name": "bench-ollama", "litellm_params": {"model": "ollama_chat/llama3.2", "api_base": base}},
            ],
            "router_settings": {"num_retries": 0, "timeout": 60, "stream_timeout": 60},
        }))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn_gateway(self, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = dict(os.environ, REDIS_URL=self.redis_url, LLM_WORKER_CONFIG=str(self.config), LLM_WORKER_PREFIX=prefix,
                   LLM_WORKER_LOG_LEVEL="WARNING")
        proc = subprocess.Popen([PY, "-c", "import sys; from llm_pool_worker.cli import main; main(sys.argv[1:])", "gateway", "--port", str(port)],
                                env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        return proc, f"http://127.0.0.1:{port}"

    def spawn_logged(self, prefix: str, concurrency: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
        """One ``python -m llm_pool_worker`` with a JSON log at INFO, for the times it reports."""
        full = dict(os.environ, REDIS_URL=self.redis_url, LLM_WORKER_CONFIG=str(self.config), LLM_WORKER_PREFIX=prefix,
                    LLM_WORKER_CONCURRENCY=str(concurrency), LLM_WORKER_LOG_FORMAT="json", **env)
        return subprocess.Popen([PY, "-m", "llm_pool_worker"], env=full, cwd=ROOT, stderr=log.open("wb"), stdout=subprocess.DEVNULL)

    def spawn_workers(self, count: int, prefix: str, concurrency: int, **env: str) -> list[subprocess.Popen[bytes]]:
        full = dict(os.environ, REDIS_URL=self.redis_url, LLM_WORKER_CONFIG=str(self.config), LLM_WORKER_PREFIX=prefix,
                    LLM_WORKER_CONCURRENCY=str(concurrency), LLM_WORKER_LOG_LEVEL="WARNING")
        full.update(env)
        return [subprocess.Popen([PY, "-m", "llm_pool_worker"], env=full, cwd=ROOT, stderr=subprocess.DEVNULL) for _ in range(count)]


async def wait_workers(redis: aioredis.Redis, prefix: str, count: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len([k async for k in redis.scan_iter(f"{prefix}:worker:*")]) >= count:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("workers did not start")


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)


def job_bytes(prefix: str, rid: str, text: str, stream: bool, model: str = "bench", tenant: str = "bench") -> bytes:
    return json.dumps({"request_id": rid, "tenant_id": tenant, "model": model, "stream": stream,
                       "messages": [{"role": "user", "content": text}]}).encode()


# ---- measurements -----------------------------------------------------------------------------


@dataclass
class Run:
    calls: int
    seconds: float
    ttft: list[float]
    tokens: int = 0
    chunks: int = 0
    cpu_s: float = 0.0

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def closed_loop(concurrency: int, total: int, one: Callable[[int], Any]) -> float:
    counter = iter(range(total))

    async def user() -> None:
        for i in counter:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return time.perf_counter() - started


async def baseline(router: Any, concurrency: int, total: int, stream: bool, tokens: int, model: str = "bench") -> Run:
    ttft: list[float] = []
    counted = [0, 0]
    text = f"#tokens={tokens}"

    async def one(i: int) -> None:
        started = time.perf_counter()
        messages = [{"role": "user", "content": text}]
        if not stream:
            await router.acompletion(model=model, messages=messages)
            ttft.append(time.perf_counter() - started)
            return
        response = await router.acompletion(model=model, messages=messages, stream=True, stream_options={"include_usage": True})
        first = None
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                counted[1] += 1
                if first is None:
                    first = time.perf_counter()
                    ttft.append(first - started)
        counted[0] += tokens

    cpu = time.process_time()
    seconds = await closed_loop(concurrency, total, one)
    return Run(total, seconds, ttft, counted[0], counted[1], time.process_time() - cpu)


async def through_workers(redis: aioredis.Redis, sub: Subscriber, prefix: str, concurrency: int, total: int,
                          stream: bool, tokens: int, model: str = "bench") -> Run:
    ttft: list[float] = []
    stats = [0, 0]
    jobs = f"{prefix}:jobs"
    run = uuid.uuid4().hex[:6]

    async def one(i: int) -> None:
        rid = f"{run}-{i}"
        pending = sub.waiting[rid] = Pending(time.perf_counter())
        await redis.xadd(jobs, {"job": job_bytes(prefix, rid, f"#tokens={tokens}", stream, model)})
        await pending.done
        del sub.waiting[rid]
        if pending.kind == "error":
            raise RuntimeError(f"job {rid} failed")
        ttft.append((pending.first or pending.done.result()) - pending.sent)
        stats[0] += tokens
        stats[1] += pending.chunks

    seconds = await closed_loop(concurrency, total, one)
    return Run(total, seconds, ttft, stats[0], stats[1])


async def through_gateway(url: str, key: str, concurrency: int, total: int, stream: bool, tokens: int) -> Run:
    """OpenAI's chat completions over HTTP, streamed (SSE) or whole; TTFT is to the first content event."""
    import aiohttp  # the bench client: cheaper per request than httpx, so that the gateway's cost is what shows

    ttft: list[float] = []
    body = json.dumps({"model": "bench", "stream": stream, "messages": [{"role": "user", "content": f"#tokens={tokens}"}]})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                                     connector=connector) as session:

        async def one(i: int) -> None:
            started = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
                if not stream:
                    await resp.read()
                    ttft.append(time.perf_counter() - started)
                    return
                first = None
                async for line in resp.content:
                    if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                        first = time.perf_counter()
                        ttft.append(first - started)

        seconds = await closed_loop(concurrency, total, one)
    return Run(total, seconds, ttft, tokens * total if stream else 0)


async def gateway_figures(env: Bench, redis: aioredis.Redis, pool: Any, c: int, n: int, ttft_jobs: int,
                          base: dict[str, Any]) -> dict[str, Any]:
    """One worker behind the gateway, against bare litellm measured earlier in this run."""
    from llm_pool_gateway.auth import key_hash, new_api_key

    prefix, procs, sub = await pool(1)
    await sub.stop()
    key = new_api_key()
    await redis.hset(f"{prefix}:api-keys", key_hash(key), "bench")
    gateway, url = env.spawn_gateway(prefix)
    try:
        await through_gateway(url, key, 4, 20, True, 5)  # warm
        ttft1 = await through_gateway(url, key, 1, ttft_jobs, True, 20)
        whole = await through_gateway(url, key, c, n, False, 20)
        s50 = await through_gateway(url, key, c, n, True, 50)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        stop_workers(procs)
    p50, p99 = 1000 * pct(ttft1.ttft, 0.5), 1000 * pct(ttft1.ttft, 0.99)
    return {
        "non_stream_calls_per_s": whole.per_s,
        "stream50_calls_per_s": s50.per_s,
        "non_stream_vs_baseline": whole.per_s / base["non_stream_calls_per_s"],
        "stream50_vs_baseline": s50.per_s / base["stream50_calls_per_s"],
        "ttft_ms_1_in_flight": {"p50": p50, "p99": p99},
        "added_ttft_ms_1_in_flight": {"p50": p50 - base["ttft_ms_1_in_flight"]["p50"], "p99": p99 - base["ttft_ms_1_in_flight"]["p99"]},
        "ttft_ms_at_load": {"p50": 1000 * pct(s50.ttft, 0.5), "p99": 1000 * pct(s50.ttft, 0.99)},
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from llm_pool_worker.model_config import load_model_config
    from llm_pool_worker.router import ModelRouter

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "concurrency": args.concurrency,
    }
    c, n = args.concurrency, args.jobs
    with Bench(args) as env:
        model_router = ModelRouter(load_model_config(env.config))
        await model_router.warm_up()
        router = model_router._router
        redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(env.redis_url, max_connections=32))

        async def pool(workers: int, **worker_env: str) -> tuple[str, list[subprocess.Popen[bytes]], Subscriber]:
            prefix = "b" + uuid.uuid4().hex[:6]
            await redis.xgroup_create(f"{prefix}:jobs", f"{prefix}:workers", id="$", mkstream=True)
            procs = env.spawn_workers(workers, prefix, max(c, args.slots), **worker_env)
            await wait_workers(redis, prefix, workers)
            sub = Subscriber(env.redis_port, f"{prefix}:reply:*")
            await sub.start()
            return prefix, procs, sub

        # warm both sides before timing
        await baseline(router, 4, 20, True, 5)

        print("baseline …", file=sys.stderr)
        base_ns = await baseline(router, c, n, False, 20)
        base_s50 = await baseline(router, c, n, True, 50)
        base_s200 = await baseline(router, c, max(n // 4, 20), True, 200)
        base_ttft1 = await baseline(router, 1, args.ttft_jobs, True, 20)
        results["baseline"] = {
            "non_stream_calls_per_s": base_ns.per_s,
            "stream50_calls_per_s": base_s50.per_s,
            "stream200_tokens_per_s": base_s200.tokens_per_s,
            "cpu_ms_per_stream50_call": 1000 * base_s50.cpu_s / base_s50.calls,
            "ttft_ms_1_in_flight": {"p50": 1000 * pct(base_ttft1.ttft, 0.5), "p99": 1000 * pct(base_ttft1.ttft, 0.99)},
            "ttft_ms_at_load": {"p50": 1000 * pct(base_s50.ttft, 0.5), "p99": 1000 * pct(base_s50.ttft, 0.99)},
        }

        print("one worker …", file=sys.stderr)
        prefix, procs, sub = await pool(1)
        await through_workers(redis, sub, prefix, 4, 20, True, 5)  # warm
        w_ttft1 = await through_workers(redis, sub, prefix, 1, args.ttft_jobs, True, 20)
        w_ns = await through_workers(redis, sub, prefix, c, n, False, 20)
        w_s50 = await through_workers(redis, sub, prefix, c, n, True, 50)
        w_s200 = await through_workers(redis, sub, prefix, c, max(n // 4, 20), True, 200)
        await sub.stop()
        stop_workers(procs)
        results["worker"] = {
            "non_stream_jobs_per_s": w_ns.per_s,
            "stream50_jobs_per_s": w_s50.per_s,
            "stream200_tokens_per_s": w_s200.tokens_per_s,
            "stream200_chunk_messages_per_s": w_s200.chunks / w_s200.seconds,
            "ttft_ms_1_in_flight": {"p50": 1000 * pct(w_ttft1.ttft, 0.5), "p99": 1000 * pct(w_ttft1.ttft, 0.99)},
            "ttft_ms_at_load": {"p50": 1000 * pct(w_s50.ttft, 0.5), "p99": 1000 * pct(w_s50.ttft, 0.99)},
        }
        results["ratios"] = {
            "non_stream_jobs_vs_baseline": w_ns.per_s / base_ns.per_s,
            "stream50_jobs_vs_baseline": w_s50.per_s / base_s50.per_s,
            "stream200_tokens_vs_baseline": w_s200.tokens_per_s / base_s200.tokens_per_s,
        }
        results["added_ttft_ms"] = {
            "1_in_flight": {q: results["worker"]["ttft_ms_1_in_flight"][q] - results["baseline"]["ttft_ms_1_in_flight"][q] for q in ("p50", "p99")},
            "at_load": {q: results["worker"]["ttft_ms_at_load"][q] - results["baseline"]["ttft_ms_at_load"][q] for q in ("p50", "p99")},
        }

        print("gateway …", file=sys.stderr)
        results["gateway"] = await gateway_figures(env, redis, pool, c, n, args.ttft_jobs, results["baseline"])

        if not args.quick:  # eight more worker start-ups: not for the check that the bench runs
            results["variants_non_stream_vs_default"] = await variants(env, redis, pool, c, n)
            results["fairness_one_job_wait_s"] = await fairness(env, redis, pool)

        scale: dict[str, float] = {}
        for workers in args.workers:
            print(f"{workers} worker(s) …", file=sys.stderr)
            prefix, procs, sub = await pool(workers)
            await through_workers(redis, sub, prefix, 8, 40, True, 5)
            run = await through_workers(redis, sub, prefix, c * workers, n * workers, True, 50)
            scale[str(workers)] = run.per_s
            await sub.stop()
            stop_workers(procs)
        results["scale_out_stream50_jobs_per_s"] = scale

        print("start-up …", file=sys.stderr)
        prefix = "b" + uuid.uuid4().hex[:6]
        await redis.xgroup_create(f"{prefix}:jobs", f"{prefix}:workers", id="$", mkstream=True)
        sub = Subscriber(env.redis_port, f"{prefix}:reply:*")
        await sub.start()
        pending = sub.waiting["start-1"] = Pending(time.perf_counter())
        procs = env.spawn_workers(1, prefix, 4)
        await redis.xadd(f"{prefix}:jobs", {"job": job_bytes(prefix, "start-1", "hello", False)})
        results["startup_to_first_job_s"] = (await pending.done) - pending.sent
        await sub.stop()
        stop_workers(procs)
        started = time.perf_counter()  # the part of that start-up which is litellm's own import
        subprocess.run([PY, "-c", "import litellm"], check=True, env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True"))
        results["startup_import_litellm_s"] = time.perf_counter() - started
        print("prefork …", file=sys.stderr)
        results["prefork"] = await prefork(env, redis, c, n, [1, 2] if args.quick else [1, 2, 4])
        if args.memory_streams:
            print("memory …", file=sys.stderr)
            results["memory"] = await memory(redis, pool, args.memory_streams)

        await redis.aclose()
    return results


async def variants(env: Bench, redis: aioredis.Redis, pool: Any, c: int, n: int) -> dict[str, float]:
    """Non-stream jobs/s of one worker with a setting changed, as a ratio to the default measured
    in turn with it (default, variant, default, variant): the cost of what the setting adds."""
    tenants = env.tmp / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({**yaml.safe_load(env.config.read_text()),
                                       "tenants": {"default": {"daily_budget_usd": 1_000_000}}}))
    settings = {"shared_router_state_off": {"LLM_WORKER_SHARED_ROUTER_STATE": "false"},
                "tenants_configured": {"LLM_WORKER_CONFIG": str(tenants)},
                "resumable_streams_tokens": {"LLM_WORKER_RESUMABLE_STREAMS": "true"}}  # tokens/s of 200-token streams
    ratios = {}
    for name, extra in settings.items():
        print(f"variant {name} …", file=sys.stderr)
        streams = name.endswith("_tokens")
        rates: dict[str, list[float]] = {"default": [], name: []}
        for _ in range(2):
            for label, worker_env in (("default", {}), (name, extra)):
                prefix, procs, sub = await pool(1, **worker_env)
                await through_workers(redis, sub, prefix, 4, 20, streams, 5)
                run = await through_workers(redis, sub, prefix, c, max(n // 4, 20) if streams else n, streams, 200 if streams else 20)
                rates[label].append(run.tokens_per_s if streams else run.per_s)
                await sub.stop()
                stop_workers(procs)
        ratios[name] = sum(rates[name]) / sum(rates["default"])
    return ratios


FLOOD = 1000


async def fairness(env: Bench, redis: aioredis.Redis, pool: Any) -> dict[str, dict[str, float]]:
    """One tenant's single job: how long it waits for its answer on an idle pool, and behind
    another tenant's 1,000 queued jobs; with the waiting room (a ``tenants:`` section) and without."""
    tenants = env.tmp / "fair.yaml"
    tenants.write_text(yaml.safe_dump({**yaml.safe_load(env.config.read_text()), "tenants": {"default": {}}}))
    figures = {}
    for mode, extra in (("waiting_room", {"LLM_WORKER_CONFIG": str(tenants)}), ("arrival_order", {})):
        print(f"fairness, {mode} …", file=sys.stderr)
        prefix, procs, sub = await pool(2, LLM_WORKER_CONCURRENCY="4", **extra)
        idle = sorted([await one_job_wait(redis, sub, prefix, f"idle-{i}") for i in range(5)])
        pipe = redis.pipeline(transaction=False)
        for i in range(FLOOD):  # 100 ms each on 8 slots: 12.5 s of work
            pipe.xadd(f"{prefix}:jobs", {"job": job_bytes(prefix, f"flood-{i}", "flood #tokens=5 #slow=20", False, tenant="flood")})
        await pipe.execute()
        await asyncio.sleep(0.3)
        behind = await one_job_wait(redis, sub, prefix, "behind")
        await sub.stop()
        stop_workers(procs)
        figures[mode] = {"idle": idle[len(idle) // 2], f"behind_{FLOOD}": behind}
    return figures


async def one_job_wait(redis: aioredis.Redis, sub: Subscriber, prefix: str, rid: str) -> float:
    pending = sub.waiting[rid] = Pending(time.perf_counter())
    await redis.xadd(f"{prefix}:jobs", {"job": job_bytes(prefix, rid, "one #tokens=5 #slow=20", False, tenant="single")})
    return (await asyncio.wait_for(pending.done, 120)) - pending.sent


async def memory(redis: aioredis.Redis, pool: Any, streams: int) -> dict[str, Any]:
    """RSS per in-flight stream. A first wave of streams grows the process once (connection pool,
    allocator arenas, litellm's caches) and that memory stays; the figure is the second wave's,
    as in a worker that has carried such a load before. The first wave's is reported beside it."""
    # heartbeats every 0.5 s: their in_flight count tells when every stream has started
    prefix, procs, sub = await pool(1, LLM_WORKER_CONCURRENCY=str(streams), LLM_WORKER_HEARTBEAT_S="0.5")
    pid = procs[0].pid

    async def wave(name: str, text: str) -> int:
        for i in range(streams):
            await redis.xadd(f"{prefix}:jobs", {"job": job_bytes(prefix, f"{name}-{i}", text, True)})
        end = time.monotonic() + 120
        while time.monotonic() < end:
            raw = [await redis.get(k) async for k in redis.scan_iter(f"{prefix}:worker:*")]
            if sum(json.loads(r)["in_flight"] for r in raw if r) >= streams:
                await asyncio.sleep(3.0)  # every stream past its first token
                return rss_kib(pid)
            await asyncio.sleep(0.2)
        raise RuntimeError("the streams never were all in flight")

    async def idle() -> int:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            raw = [await redis.get(k) async for k in redis.scan_iter(f"{prefix}:worker:*")]
            if all(json.loads(r)["in_flight"] == 0 for r in raw if r):
                await asyncio.sleep(1.0)
                return rss_kib(pid)
            await asyncio.sleep(0.2)
        raise RuntimeError("the first wave never ended")

    fresh = rss_kib(pid)
    first = await wave("first", "#tokens=60 #slow=100")  # about 6 s each, then they end
    warm = await idle()
    second = await wave("second", "#tokens=100000 #slow=200")
    for proc in procs:
        proc.kill()
    await sub.stop()
    return {"streams": streams, "fresh_rss_kib": fresh, "first_wave_rss_kib": first, "warm_idle_rss_kib": warm,
            "busy_rss_kib": second, "kib_per_stream": (second - warm) / streams,
            "first_wave_kib_per_stream": (first - fresh) / streams}


def smaps_kib(pid: int) -> dict[str, int]:
    """Pss and USS (private pages) of a process: what it costs the machine beside its siblings."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def cpu_s(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(p) for p in listing.read().split()]


def log_times(path: Path, event: str) -> list[float]:
    """Unix times of a JSON log's lines with this event."""
    import datetime as dt

    times = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            times.append(dt.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp())
    return times


async def prefork(env: Bench, redis: aioredis.Redis, c: int, n: int, counts: list[int]) -> dict[str, Any]:
    """``--processes N`` against separately started processes: start-up of the first and of each
    added process, what each added process costs in memory (USS, PSS), and jobs/s for each N."""
    results: dict[str, Any] = {"jobs_per_s": {}, "worker_cpu_ms_per_job": {}}
    for count in counts:
        prefix = "b" + uuid.uuid4().hex[:6]
        await redis.xgroup_create(f"{prefix}:jobs", f"{prefix}:workers", id="$", mkstream=True)
        sub = Subscriber(env.redis_port, f"{prefix}:reply:*")
        await sub.start()
        log = env.tmp / f"prefork-{count}.log"
        pending = sub.waiting["start-1"] = Pending(time.perf_counter())
        spawned = time.time()
        proc = env.spawn_logged(prefix, c, log, LLM_WORKER_PROCESSES=str(count))
        await redis.xadd(f"{prefix}:jobs", {"job": job_bytes(prefix, "start-1", "hello", False)})
        first_served = (await pending.done) - pending.sent
        await wait_workers(redis, prefix, count)
        pids = children_of(proc.pid) if count > 1 else [proc.pid]
        await through_workers(redis, sub, prefix, 8, 40, True, 5)  # warm every process
        before = cpu_s(pids)
        run = await through_workers(redis, sub, prefix, c * count, n * count, True, 50)
        results["jobs_per_s"][str(count)] = run.per_s
        results["worker_cpu_ms_per_job"][str(count)] = 1000 * (cpu_s(pids) - before) / run.calls
        if count == max(counts):
            forked = log_times(log, "forking workers")[0]
            ready = sorted(log_times(log, "worker ready"))
            results["processes"] = count
            results["start_to_first_job_s"] = first_served
            results["fork_to_ready_s"] = [t - forked for t in ready]
            results["start_to_fork_s"] = forked - spawned
            results["supervisor"] = smaps_kib(proc.pid)
            results["children"] = [smaps_kib(pid) for pid in pids]
        elif count == 1:
            results["single"] = smaps_kib(proc.pid)
            results["single_start_to_first_job_s"] = first_served
        await sub.stop()
        stop_workers([proc])
    return results


def table(r: dict[str, Any]) -> str:
    b, w, ratio, added = r["baseline"], r["worker"], r["ratios"], r["added_ttft_ms"]
    rows = [
        ("non-stream calls/s", f"{b['non_stream_calls_per_s']:.0f}", f"{w['non_stream_jobs_per_s']:.0f}", f"{ratio['non_stream_jobs_vs_baseline']:.2f}×", "≥ 0.9×"),
        ("stream (50 tok) calls/s", f"{b['stream50_calls_per_s']:.0f}", f"{w['stream50_jobs_per_s']:.0f}", f"{ratio['stream50_jobs_vs_baseline']:.2f}×", "≥ 0.9×"),
        ("tokens/s (200-tok streams)", f"{b['stream200_tokens_per_s']:.0f}", f"{w['stream200_tokens_per_s']:.0f}", f"{ratio['stream200_tokens_vs_baseline']:.2f}×", "≥ 3×"),
        ("chunk messages/s", "", f"{w['stream200_chunk_messages_per_s']:.0f}", "", ""),
        ("TTFT p50/p99 ms, 1 in flight", "{p50:.2f} / {p99:.2f}".format(**b["ttft_ms_1_in_flight"]), "{p50:.2f} / {p99:.2f}".format(**w["ttft_ms_1_in_flight"]), "+{p50:.2f} / +{p99:.2f}".format(**added["1_in_flight"]), "≤ +2 / +10"),
        ("TTFT p50/p99 ms, at load", "{p50:.1f} / {p99:.1f}".format(**b["ttft_ms_at_load"]), "{p50:.1f} / {p99:.1f}".format(**w["ttft_ms_at_load"]), "+{p50:.1f} / +{p99:.1f}".format(**added["at_load"]), ""),
    ]
    if "gateway" in r:
        g = r["gateway"]
        rows.append(("gateway: stream (50 tok) calls/s", f"{b['stream50_calls_per_s']:.0f}", f"{g['stream50_calls_per_s']:.0f}", f"{g['stream50_vs_baseline']:.2f}×", ""))
        rows.append(("gateway: non-stream calls/s", f"{b['non_stream_calls_per_s']:.0f}", f"{g['non_stream_calls_per_s']:.0f}", f"{g['non_stream_vs_baseline']:.2f}×", ""))
        rows.append(("gateway: TTFT p50/p99 ms, 1 in flight", "{p50:.2f} / {p99:.2f}".format(**b["ttft_ms_1_in_flight"]), "{p50:.2f} / {p99:.2f}".format(**g["ttft_ms_1_in_flight"]), "+{p50:.2f} / +{p99:.2f}".format(**g["added_ttft_ms_1_in_flight"]), ""))
    scale = r["scale_out_stream50_jobs_per_s"]
    if "1" in scale:
        for k, v in scale.items():
            rows.append((f"{k} worker process(es), jobs/s", "", f"{v:.0f}", f"{v / scale['1']:.2f}× of 1", "2: ≥ 1.7×" if k == "2" else ""))
    if r.get("memory", {}).get("kib_per_stream") is not None:
        m = r["memory"]
        rows.append((f"RSS per in-flight stream ({m['streams']})", "", f"{m['kib_per_stream']:.1f} KiB", f"first wave {m['first_wave_kib_per_stream']:.0f} KiB", "≤ 50 KiB"))
    for name, ratio in r.get("variants_non_stream_vs_default", {}).items():
        what = "tokens/s, resumable streams" if name == "resumable_streams_tokens" else f"non-stream jobs/s, {name.replace('_', ' ')}"
        rows.append((what, "", "", f"{ratio:.2f}× of default", "≥ 0.9×"))
    for mode, waits in r.get("fairness_one_job_wait_s", {}).items():
        rows.append((f"one job's wait, {mode.replace('_', ' ')}", "", f"idle {waits['idle']:.2f} s",
                     f"behind {FLOOD} of another tenant's: {waits[f'behind_{FLOOD}']:.2f} s", "≈ one job" if mode == "waiting_room" else ""))
    if "prefork" in r:
        p = r["prefork"]
        one = p["jobs_per_s"]["1"]
        for k, v in p["jobs_per_s"].items():
            rows.append((f"--processes {k}: stream (50 tok) jobs/s", "", f"{v:.0f}", f"{v / one:.2f}× of 1; worker CPU {p['worker_cpu_ms_per_job'][k]:.2f} ms/job", ""))
        uss = [c["uss"] / 1024 for c in p["children"]]
        rows.append((f"--processes {p['processes']}: own memory (USS) per process", "", f"{p['single']['uss'] / 1024:.0f} MB alone",
                     "forked: " + ", ".join(f"{u:.0f}" for u in uss) + " MB", "≤ 120 MB"))
        rows.append((f"--processes {p['processes']}: fork → worker ready", "", f"{p['single_start_to_first_job_s']:.2f} s alone",
                     ", ".join(f"{t:.2f}" for t in p["fork_to_ready_s"]) + " s", "≤ 0.5 s"))
    rows.append(("start-up to first job served", "", f"{r['startup_to_first_job_s']:.2f} s",
                 f"import litellm {r['startup_import_litellm_s']:.2f} s", "≤ 3 s"))
    widths = [max(len(str(row[i])) for row in [*rows, ("figure", "bare litellm", "worker", "ratio / added", "target")]) for i in range(5)]
    lines = []
    for row in [("figure", "bare litellm", "worker", "ratio / added", "target"), *rows]:
        lines.append("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)))
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    scale = r["scale_out_stream50_jobs_per_s"]
    xs = [int(k) for k in scale]
    left.plot(xs, list(scale.values()), "o-", label="worker pool")
    left.axhline(r["baseline"]["stream50_calls_per_s"], color="grey", ls="--", label="bare litellm, 1 process")
    left.set_xlabel("worker processes")
    left.set_ylabel("jobs/s (50-token streams)")
    left.set_xticks(xs)
    left.set_ylim(bottom=0)
    left.set_title("throughput vs worker processes")
    left.legend()
    labels = ["1 in flight\np50", "1 in flight\np99", f"{r['concurrency']} in flight\np50", f"{r['concurrency']} in flight\np99"]
    xs2 = list(range(len(labels)))
    for offset, side, name in ((-0.2, "baseline", "bare litellm stream"), (0.2, "worker", "XADD → first chunk seen")):
        ttft = r[side]
        values = [ttft["ttft_ms_1_in_flight"]["p50"], ttft["ttft_ms_1_in_flight"]["p99"],
                  ttft["ttft_ms_at_load"]["p50"], ttft["ttft_ms_at_load"]["p99"]]
        bars = right.bar([x + offset for x in xs2], values, width=0.4, label=name)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(xs2, labels)
    right.set_yscale("log")
    right.set_ylabel("time to first token, ms (log)")
    right.set_title("time to first token: through the queue vs bare litellm")
    right.legend(fontsize=8)
    fig.suptitle(f"llm-pool-worker bench, {r['date']}, {r['machine']['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", "-c", type=int, default=64)
    parser.add_argument("--jobs", "-n", type=int, default=1000, help="jobs per throughput figure")
    parser.add_argument("--ttft-jobs", type=int, default=200)
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--memory-streams", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=64, help="worker concurrency (at least -c)")
    parser.add_argument("--quick", action="store_true", help="a few jobs of each kind: checks that the bench runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results.json")
    parser.add_argument("--plot", type=Path, help="write a PNG of throughput vs workers and added TTFT")
    parser.add_argument("--from-json", type=Path, help="measure nothing: print and plot the results in this file")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.jobs, args.ttft_jobs, args.workers, args.memory_streams = 4, 24, 10, [1], 10
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = json.loads(args.from_json.read_text()) if args.from_json else runner(measure(args))
    print(table(results))
    if not args.from_json:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    written = ([] if args.from_json else [str(args.out)]) + ([str(args.plot)] if args.plot else [])
    if written:
        print("\nwritten: " + ", ".join(written), file=sys.stderr)


if __name__ == "__main__":
    main()
