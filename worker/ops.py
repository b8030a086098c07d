"""The operator's commands: is a worker alive (``health``), can it serve (``ready``), what does it
serve (``models``). Each answers in one line on failure and exits non-zero, for probes."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, cast

import redis.asyncio as aioredis

from llm_pool_contracts import LANES, Heartbeat, InvalidMessage, Keys, decode_heartbeat
from llm_pool_worker.backoff import REDIS_DOWN, describe
from llm_pool_worker.connections import group_figures, redis_target
from llm_pool_worker.model_config import ModelConfig, load_model_config
from llm_pool_worker.settings import Settings


class Unhealthy(Exception):
    """One line: why the probe fails."""


async def heartbeats(redis: aioredis.Redis, keys: Keys) -> list[Heartbeat]:
    beats = []
    async for key in redis.scan_iter(match=keys.worker("*"), count=1000):
        raw = await redis.get(key)
        if raw is not None:
            try:
                beats.append(decode_heartbeat(raw))
            except InvalidMessage:
                continue
    return beats


def fresh(beats: list[Heartbeat], heartbeat_s: float) -> list[Heartbeat]:
    """The heartbeats younger than the key's own lifetime (three intervals): workers alive now."""
    now_ms = time.time() * 1000
    return [b for b in beats if now_ms - b.heartbeat_at_ms <= 3 * heartbeat_s * 1000]


async def check_health(settings: Settings, consumer: str | None, pid: int | None) -> str:
    """The worker named (or, by default, every worker of this host): its heartbeat is fresh and Redis answers."""
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=3, socket_connect_timeout=3)
    try:
        beats = await heartbeats(redis, Keys(settings.prefix))
    except REDIS_DOWN as exc:
        raise Unhealthy(f"redis at {redis_target(settings)} does not answer ({describe(exc)})") from None
    finally:
        await redis.aclose()
    host = socket.gethostname()
    mine = [b for b in beats if _is_the_one(b, consumer, pid, host)]
    if not mine:
        who = f"consumer {consumer}" if consumer else f"pid {pid} on {host}" if pid else f"any worker on {host}"
        raise Unhealthy(f"no heartbeat of {who}")
    alive = fresh(mine, settings.heartbeat_s)
    if not alive:
        age = min(time.time() * 1000 - b.heartbeat_at_ms for b in mine) / 1000
        raise Unhealthy(f"heartbeat {age:.1f} s old (fresh is under {3 * settings.heartbeat_s:g} s): the worker is stuck or Redis refuses its writes")
    return f"ok: {', '.join(f'{b.consumer} ({b.in_flight} in flight)' for b in alive)}"


def _is_the_one(beat: Heartbeat, consumer: str | None, pid: int | None, host: str) -> bool:
    """The worker asked about; ``--pid`` of a supervisor (``--processes``) means its workers."""
    if consumer:
        return beat.consumer == consumer
    return beat.host == host and (pid is None or pid in (beat.pid, parent_pid(beat.pid)))


def parent_pid(pid: int) -> int | None:
    """The parent of a process of this host (the probe runs beside the worker), if it is alive."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


async def gather_status(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """Live workers from their heartbeats, and the queue: what ``llm-worker status`` shows."""
    now = time.time()
    workers = [{"consumer": b.consumer, "host": b.host, "pid": b.pid, "version": b.version,
                "uptime_s": round(now - b.started_at_ms / 1000), "in_flight": b.in_flight, "completed": b.completed,
                "failed": b.failed, "unwritten": b.unwritten, "heartbeat_age_s": round(now - b.heartbeat_at_ms / 1000, 1)}
               for b in sorted(await heartbeats(redis, keys), key=lambda b: b.consumer)]
    lanes = [await lane_figures(redis, keys, lane, stream) for lane, stream in zip(LANES, keys.lanes(), strict=True)]
    dead = int(await redis.xlen(keys.dead))
    # "queue" is the interactive lane, as before there were lanes
    return {"workers": workers, "queue": {**lanes[0], "dead_letters": dead}, "lanes": lanes, "dead_letters": dead}


async def lane_figures(redis: aioredis.Redis, keys: Keys, lane: str, stream: str) -> dict[str, Any]:
    figures: dict[str, Any] = {"lane": lane, "length": int(await redis.xlen(stream)), "lag": None, "pending": 0,
                               "oldest_pending_s": None, "waiting": 0, "taken": 0}
    with contextlib.suppress(aioredis.ResponseError):  # no group yet
        lag, pending, oldest_s = await group_figures(redis, stream, keys.group)
        figures.update(lag=lag, pending=pending, oldest_pending_s=round(oldest_s, 1) if oldest_s is not None else None)
    with contextlib.suppress(aioredis.ResponseError):  # the waiting room: jobs in tenants' queues, and taken ones running
        tenants = cast(list[bytes], await redis.zrange(keys.waiting(lane), 0, -1))
        pipe = redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.llen(keys.wait(lane, tenant.decode()))
        figures["waiting"] = sum(int(n) for n in await pipe.execute())
        figures["taken"] = int((await redis.xpending(keys.run(lane), keys.group))["pending"])
    return figures


def status_tables(status: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    workers = Table(title=f"workers ({len(status['workers'])})")
    for column in ("consumer", "host", "pid", "version", "uptime_s", "in_flight", "completed", "failed", "unwritten", "heartbeat_age_s"):
        workers.add_column(column, justify="right" if column not in ("consumer", "host", "version") else "left")
    for worker in status["workers"]:
        workers.add_row(*(str(v) for v in worker.values()))
    queue = Table(title=f"queue (dead letters: {status['dead_letters']})")
    for column in status["lanes"][0]:
        queue.add_column(column, justify="left" if column == "lane" else "right")
    for lane in status["lanes"]:
        queue.add_row(*("-" if v is None else str(v) for v in lane.values()))
    return Group(workers, queue)


def check_ready(settings: Settings) -> str:
    """The model config loads as the worker would load it, and every group it names has a deployment."""
    config = load_model_config(settings.config, check=True)
    empty = sorted({entry.split(":", 1)[0] for entry in config.left_out} - config.groups)
    if empty:
        raise Unhealthy(f"no usable deployment for group(s) {', '.join(empty)}: their API key variables are unset")
    return f"ok: groups {', '.join(sorted(config.groups))}"


def describe_models(config: ModelConfig) -> list[str]:
    """The groups, their deployments in order, fallbacks, and what was left out. Never a key."""
    lines = []
    for group in sorted(config.groups):
        deployments = sorted((d for d in config.deployments if d.group == group), key=lambda d: d.params.get("order", 0))
        lines.append(f"{group}: " + " → ".join(d.model for d in deployments))
    for rule in config.router_settings.get("fallbacks") or []:
        lines += [f"fallback: {source} → {', '.join(targets)}" for source, targets in rule.items()]
    lines += [f"left out (API key variable unset): {entry}" for entry in config.left_out]
    return lines
