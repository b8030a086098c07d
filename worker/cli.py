"""``llm-worker``: run a worker process, or send one job from the terminal."""

from __future__ import annotations

import argparse
import asyncio
import csv
import difflib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import redis.asyncio as aioredis
import structlog
import uvloop

from llm_pool_worker.logs import configure_logging, secrets_of
from llm_pool_worker.settings import Settings

log = structlog.get_logger("worker")

RUN_FLAGS: dict[str, tuple[type, str]] = {
    "redis_url": (str, "Redis URL (REDIS_URL)"),
    "config": (Path, "model groups YAML (LLM_WORKER_CONFIG)"),
    "prefix": (str, "key prefix (LLM_WORKER_PREFIX)"),
    "concurrency": (int, "jobs in flight per process (LLM_WORKER_CONCURRENCY)"),
    "processes": (int, "worker processes forked from one supervisor (LLM_WORKER_PROCESSES)"),
    "heartbeat_s": (float, "liveness refresh interval (LLM_WORKER_HEARTBEAT_S)"),
    "job_timeout_s": (float, "hard limit of one job (LLM_WORKER_JOB_TIMEOUT_S)"),
    "shutdown_grace_s": (float, "SIGTERM grace period (LLM_WORKER_SHUTDOWN_GRACE_S)"),
    "log_level": (str, "DEBUG, INFO, WARNING… (LLM_WORKER_LOG_LEVEL)"),
    "log_format": (str, "auto, json or console (LLM_WORKER_LOG_FORMAT)"),
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a worker process, or --processes N of them (flags override the environment)")
    for name, (kind, help_text) in RUN_FLAGS.items():
        run.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    ask = commands.add_parser("ask", help="enqueue one job and print its answer (streamed with --stream)")
    ask.add_argument("prompt")
    ask.add_argument("--model", default="fast")
    ask.add_argument("--stream", action="store_true")
    ask.add_argument("--tenant", default="cli")
    ask.add_argument("--timeout", type=float, default=120.0)
    ask.add_argument("--redis-url", dest="redis_url")
    ask.add_argument("--prefix")
    add_operator_commands(commands)
    add_dead_commands(commands)
    add_gateway_commands(commands)
    check = commands.add_parser("check-config", help="check a model config file as the worker would load it")
    check.add_argument("file", type=Path)
    usage = commands.add_parser("usage", help="print the usage ledger: requests, tokens and cost per tenant")
    usage.add_argument("--tenant", help="one tenant (default: all)")
    usage.add_argument("--since", help="first UTC day, YYYY-MM-DD (inclusive)")
    usage.add_argument("--until", help="last UTC day, YYYY-MM-DD (inclusive)")
    usage.add_argument("--by", choices=("group", "day"), default="group", help="one row per tenant and group, or per tenant and day")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON lines, one per row")
    output.add_argument("--csv", action="store_true", help="CSV with a header")
    usage.add_argument("--redis-url", dest="redis_url")
    usage.add_argument("--prefix")
    return parser.parse_args(argv)


async def show_status(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_contracts import Keys
    from llm_pool_worker.ops import gather_status, status_tables

    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)
    keys = Keys(settings.prefix)
    try:
        if args.json:
            print(json.dumps(await gather_status(redis, keys)))
        elif not args.watch:
            from rich.console import Console

            Console().print(status_tables(await gather_status(redis, keys)))
        else:
            from rich.live import Live

            with Live(status_tables(await gather_status(redis, keys)), auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(args.interval)
                    live.update(status_tables(await gather_status(redis, keys)), refresh=True)
    except REDIS_DOWN_ERRORS as exc:
        raise UsageError(f"redis does not answer ({type(exc).__name__})") from None
    finally:
        await redis.aclose()
    return 0


def add_operator_commands(commands: Any) -> None:
    """health, ready, status and models."""
    for name, text in (("health", "exit 0 if the worker's heartbeat is fresh and Redis answers (a liveness probe)"),
                       ("ready", "health, and the model config loads with a deployment for every group (a readiness probe)")):
        probe = commands.add_parser(name, help=text)
        which = probe.add_mutually_exclusive_group()
        which.add_argument("--consumer", help="the worker's consumer name")
        which.add_argument("--pid", type=int, help="the worker's pid on this host (default: any worker on this host)")
        probe.add_argument("--redis-url", dest="redis_url")
        probe.add_argument("--prefix")
    status = commands.add_parser("status", help="live workers (from their heartbeats) and the queue")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument("--watch", action="store_true", help="refresh in place until interrupted")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    status.add_argument("--redis-url", dest="redis_url")
    status.add_argument("--prefix")
    models = commands.add_parser("models", help="the model groups, their deployments in order, fallbacks, what is left out")
    models.add_argument("--config", type=Path, help="model groups YAML (LLM_WORKER_CONFIG)")
    acl = commands.add_parser("acl", help="print the ACL SETUSER line for a Redis user limited to the pool's keys and commands")
    acl.add_argument("--user", default="llm-pool", help="the user's name (default: llm-pool)")
    acl.add_argument("--role", action="append", choices=("worker", "client", "operator"),
                     help="what the user does; repeat for several (default: all three)")
    acl.add_argument("--prefix")


def add_gateway_commands(commands: Any) -> None:
    """gateway, and api-key to manage its keys."""
    gateway = commands.add_parser("gateway", help="serve the pool over HTTP: the seed's API and OpenAI's (the [gateway] extra)")
    gateway.add_argument("--host", help="address to listen on (LLM_WORKER_GATEWAY_HOST, default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port to listen on (LLM_WORKER_GATEWAY_PORT, default 8080)")
    for name in ("redis_url", "config", "prefix", "log_level", "log_format"):
        kind, help_text = RUN_FLAGS[name]
        gateway.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    api_key = commands.add_parser("api-key", help="the gateway's API keys, kept in Redis by their SHA-256 only")
    verbs = api_key.add_subparsers(dest="key_command", required=True)
    verbs.add_parser("add", help="make a key for a tenant; it is printed once and never stored").add_argument("tenant")
    verbs.add_parser("list", help="every key's hash and tenant (from Redis and from the config)")
    verbs.add_parser("revoke", help="remove a key kept in Redis").add_argument("key_or_hash", help="the key, or 8+ hex digits of its hash")
    verbs.add_parser("hash", help="print the SHA-256 of a key read from stdin, for the config's gateway.api_keys")
    for verb in verbs.choices.values():
        verb.add_argument("--redis-url", dest="redis_url")
        verb.add_argument("--prefix")
        verb.add_argument("--config", type=Path, help="model groups YAML (LLM_WORKER_CONFIG)")


async def api_keys(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_contracts import Keys, is_ident
    from llm_pool_gateway.auth import ApiKeys, key_hash
    from llm_pool_worker.model_config import DECLARED, load_model_config

    if args.key_command == "hash":
        print(key_hash(sys.stdin.readline().strip()))
        return 0
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)
    keys = ApiKeys(redis, Keys(settings.prefix), load_model_config(settings.config, env=DECLARED).api_keys)
    try:
        if args.key_command == "add":
            if not is_ident(args.tenant):
                raise UsageError("a tenant id is 1 to 128 letters, digits or . _ : -")
            print(await keys.add(args.tenant))
            print(f"(the key of tenant {args.tenant}; it is shown only now)", file=sys.stderr)
        elif args.key_command == "list":
            print_rows([{"sha256": d, "tenant": t, "kept_in": w} for d, t, w in await keys.listing()], ["sha256", "tenant", "kept_in"], "table")
        else:
            gone = await keys.revoke(args.key_or_hash)
            print(f"revoked {gone[0]}" if gone else "no such key in redis (keys in the config are removed from the config)")
            return 0 if gone else 1
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except REDIS_DOWN_ERRORS as exc:
        raise UsageError(f"redis does not answer ({type(exc).__name__})") from None
    finally:
        await redis.aclose()
    return 0


def add_dead_commands(commands: Any) -> None:
    dead = commands.add_parser("dead", help="the dead-letter stream: list, show, replay, purge")
    verbs = dead.add_subparsers(dest="dead_command", required=True)
    listing = verbs.add_parser("list", help="the newest dead letters first")
    listing.add_argument("--code", help="only this error code")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="JSON lines")
    verbs.add_parser("show", help="one dead letter, every field").add_argument("id")
    replay = verbs.add_parser("replay", help="run jobs again from scratch (their stored outcome is removed)")
    replay.add_argument("ids", nargs="*", help="dead-letter entry ids")
    replay.add_argument("--all", action="store_true", help="every dead letter (with --code: of that code)")
    replay.add_argument("--code")
    purge = verbs.add_parser("purge", help="remove dead letters")
    purge.add_argument("--older-than", dest="older_than", type=float, metavar="DAYS", help="only those older (default: all)")
    for verb in (listing, replay, purge, verbs.choices["show"]):
        verb.add_argument("--redis-url", dest="redis_url")
        verb.add_argument("--prefix")


async def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_contracts import Keys
    from llm_pool_worker import deadletters

    keys = Keys(settings.prefix)
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        if args.dead_command == "list":
            entries = await deadletters.list_dead(redis, keys, args.code, args.limit)
            lines = [entry.summary() for entry in entries]
            print_rows(lines, list(lines[0]) if lines else ["id"], "json" if args.json else "table")
        elif args.dead_command == "show":
            entry = await deadletters.show_dead(redis, keys, args.id)
            if entry is None:
                raise UsageError(f"no dead letter {args.id}")
            for name, value in entry.fields.items():
                print(f"{name}: {value.decode(errors='replace')}")
        elif args.dead_command == "replay":
            return await replay_dead(redis, keys, settings, args)
        else:
            print(f"purged {await deadletters.purge(redis, keys, args.older_than)} dead letters")
    finally:
        await redis.aclose()
    return 0


async def replay_dead(redis: aioredis.Redis, keys: Any, settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_contracts import InvalidJob
    from llm_pool_worker import deadletters

    if args.all:
        entries = await deadletters.list_dead(redis, keys, args.code, limit=1_000_000)
    else:
        found = [await deadletters.show_dead(redis, keys, entry_id) for entry_id in args.ids]
        entries = [e for e in found if e is not None]
        if len(entries) < len(args.ids):
            raise UsageError("no such dead letter: " + ", ".join(set(args.ids) - {e.id for e in entries}))
    refused = 0
    for entry in entries:
        try:
            new_id = await deadletters.replay(redis, keys, entry, settings.max_job_bytes)
            print(f"replayed {entry.id} (request {entry.request_id}) as {new_id}")
        except InvalidJob as exc:
            refused += 1
            print(f"refused {entry.id}: {exc.reason}", file=sys.stderr)
    return 1 if refused else 0


REDIS_DOWN_ERRORS = (ConnectionError, TimeoutError, OSError, aioredis.ConnectionError, aioredis.TimeoutError)


class UsageError(Exception):
    """A configuration mistake: one line for the operator, never a traceback, never a secret."""


def env_name(field: str) -> str:
    return "REDIS_URL" if field == "redis_url" else f"LLM_WORKER_{field.upper()}"


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """The settings, or :class:`UsageError` naming the variable (or flag) that is wrong. A value is
    never repeated in the message: it may be a password."""
    environ = dict(os.environ) if environ is None else environ
    known = {env_name(f) for f in Settings.model_fields} | {"LLM_WORKER_REDIS_URL"}
    for name in sorted(n for n in environ if n.startswith("LLM_WORKER_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        raise UsageError(f"unknown variable {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = f"{env_name(field)} (or --{field.replace('_', '-')}): " if field else ""
        raise UsageError(where + first["msg"]) from None


class Signals:
    """SIGTERM/SIGINT: the first stops taking jobs and drains; the second leaves in-flight jobs to others.
    Installed before the slow start-up, so that a signal during it is honoured too.

    A forked child handles SIGTERM only (its supervisor forwards a terminal's SIGINT, once), and
    takes a second SIGTERM within ``same_stop_s`` of the first for the same stop: systemd's
    default ``KillMode=control-group`` signals every process of the unit, and the supervisor
    forwards its own signal too, so each child gets the one stop twice.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM), same_stop_s: float = 0.0) -> None:
        self.count = 0
        self.worker: Any = None
        self.same_stop_s = same_stop_s
        self._first_at = 0.0
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self.count == 1 and now - self._first_at < self.same_stop_s:
            return
        self._first_at = self._first_at or now
        self.count += 1
        if self.count == 1:
            log.info("signal received; finishing in-flight jobs", signal=sig.name)
            if self.worker is not None:
                self.worker.stop()
        else:
            log.warning("second signal; leaving in-flight jobs to other workers", signal=sig.name)
            if self.worker is not None:
                self.worker.abort()


async def serve(settings: Settings, config: Any = None, signals: Signals | None = None) -> None:
    """One worker's life; ``config`` when a supervisor loaded (and checked) it before forking."""
    from llm_pool_worker.model_config import load_model_config
    from llm_pool_worker.router import ModelRouter, SharedState
    from llm_pool_worker.service import Worker
    from llm_pool_worker.transport import limits_of

    signals = signals or Signals()
    shared = SharedState(settings.redis_url.get_secret_value(), f"{settings.prefix}:router") if settings.shared_router_state else None
    router = ModelRouter(config or load_model_config(settings.config, check=True), lean_streams=settings.lean_streams,
                         limits=limits_of(settings), shared=shared)
    await router.warm_up()
    if signals.count:
        log.info("stopped during start-up")
        return
    signals.worker = Worker(settings, router)
    await signals.worker.run()
    if signals.worker.failed:
        raise SystemExit(1)


async def ask(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_client import JobFailed, LLMClient, ReplyTimeout

    async with LLMClient.from_url(settings.redis_url.get_secret_value(), prefix=settings.prefix) as client:
        messages = [{"role": "user", "content": args.prompt}]
        request_id = uuid.uuid4().hex
        try:
            if args.stream:
                return await _print_stream(client, args, messages, request_id)
            result = await client.complete(args.model, messages, tenant_id=args.tenant, request_id=request_id, timeout=args.timeout)
            print(result.content)
            print(json.dumps({"provider_model": result.provider_model, "usage": [result.usage.prompt_tokens, result.usage.completion_tokens], "cost_usd": result.cost_usd}), file=sys.stderr)
        except JobFailed as exc:
            print(f"error {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except ReplyTimeout as exc:
            print(f"error: {exc} (the job was cancelled)", file=sys.stderr)
            return 1
    return 0


async def _print_stream(client: Any, args: argparse.Namespace, messages: list[dict[str, Any]], request_id: str) -> int:
    """Print tokens as they arrive. When the job starts again (a higher ``attempt``), the text so
    far is void: say so and print the new attempt from its start."""
    from llm_pool_contracts import Chunk

    attempt, line_open = 0, False
    try:
        async for event in client.stream(args.model, messages, tenant_id=args.tenant, request_id=request_id, timeout=args.timeout):
            if event.attempt != attempt and line_open:
                print(flush=True)
                print(f"[generation started again as attempt {event.attempt}; the text above is void]", file=sys.stderr, flush=True)
            attempt = event.attempt
            if isinstance(event, Chunk):
                print(event.text, end="", flush=True)
                line_open = True
            else:
                print()
                print(json.dumps({"provider_model": event.provider_model, "chunks": event.seq, "usage": [event.usage.prompt_tokens, event.usage.completion_tokens], "cost_usd": event.cost_usd}), file=sys.stderr)
    except BaseException:
        if line_open:
            print(flush=True)  # the error message starts on its own line
        raise
    return 0


USAGE_COLUMNS = ("tenant_id", "group", "day", "requests", "prompt_tokens", "completion_tokens", "estimated",
                 "cost_usd", "unpriced", "errors")


async def usage(settings: Settings, args: argparse.Namespace) -> int:
    """The ledger summed per tenant and group (or day), as a table, JSON lines or CSV."""
    from llm_pool_client import LLMClient, UsageRow
    from llm_pool_client.usage import as_dict

    async with LLMClient.from_url(settings.redis_url.get_secret_value(), prefix=settings.prefix) as client:
        rows = await client.usage(args.tenant, args.since, args.until)
    sums: dict[tuple[str, str], UsageRow] = {}
    for row in rows:
        key = (row.tenant_id, row.group if args.by == "group" else row.day)
        total = sums.setdefault(key, UsageRow(row.tenant_id, row.day if args.by == "day" else "", row.group if args.by == "group" else ""))
        total.add(row)
    columns = [c for c in USAGE_COLUMNS if c != ("day" if args.by == "group" else "group")]
    lines = [{c: as_dict(r)[c] for c in columns} for _, r in sorted(sums.items())]
    print_rows(lines, columns, "json" if args.json else "csv" if args.csv else "table")
    return 0


def print_rows(lines: list[dict[str, Any]], columns: list[str], form: str) -> None:
    if form == "json":
        for line in lines:
            print(json.dumps(line))
        return
    cells = [[json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else str(v) for v in line.values()] for line in lines]
    if form == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(cells)
        return
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for row in [columns, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def profiled(settings: Settings, path: Path) -> None:
    """Run the worker under pyinstrument (a dev dependency) and write where its CPU time went."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise UsageError("LLM_WORKER_PROFILE needs pyinstrument, a development tool: pip install pyinstrument") from None

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        uvloop.run(serve(settings))
    finally:
        profiler.stop()
        path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sys.exit(run_command(args))
    except UsageError as exc:
        print(f"llm-worker: {exc}", file=sys.stderr)
        sys.exit(2)


def probe(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_worker.model_config import ConfigError, load_model_config
    from llm_pool_worker.ops import Unhealthy, check_health, check_ready, describe_models

    try:
        if args.command == "models":
            print("\n".join(describe_models(load_model_config(settings.config, check=True))))
            return 0
        lines = [uvloop.run(check_health(settings, args.consumer, args.pid))]
        if args.command == "ready":
            lines.append(check_ready(settings))
    except (Unhealthy, ConfigError) as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    print("; ".join(lines))
    return 0


def serve_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from llm_pool_worker.model_config import ConfigError

    try:
        from llm_pool_gateway.server import serve as serve_http
    except ImportError as exc:
        raise UsageError(f"the gateway needs the [gateway] extra: pip install 'llm-pool-worker[gateway]' ({exc.name} is missing)") from None
    try:
        serve_http(settings, args.host, args.port)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return 0


def run_supervised(settings: Settings) -> int:
    """``--processes N``: what every worker would load, loaded once; then N forked workers."""
    import llm_pool_worker.service  # noqa: F401  # the import graph every child needs: litellm above all
    from llm_pool_worker.model_config import load_model_config
    from llm_pool_worker.router import preload
    from llm_pool_worker.supervisor import Supervisor, reserve_for_forking

    config = load_model_config(settings.config, check=True)  # a bad config is refused once, before any fork
    uvloop.run(preload(config))
    reserve_for_forking()

    def serve_child(index: int) -> None:
        port = settings.metrics_port
        child = settings.model_copy(update={"metrics_port": port + index if port else None, "processes": 1})
        try:
            uvloop.run(_serve_forked(child, config))
        except UsageError as exc:
            print(f"llm-worker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return Supervisor(settings.processes, serve_child, settings.shutdown_grace_s).run()


async def _serve_forked(settings: Settings, config: Any) -> None:
    from llm_pool_worker.permissions import AccessRefused

    try:
        await serve(settings, config, Signals((signal.SIGTERM,), same_stop_s=1.0))
    except AccessRefused as exc:
        raise UsageError(str(exc)) from None


#: Commands that run one coroutine with the settings and the arguments.
ASYNC_COMMANDS: dict[str, Any] = {"dead": dead_letters, "status": show_status, "api-key": api_keys, "ask": ask, "usage": usage}


def run_command(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        from llm_pool_worker.model_config import check_model_config

        problems = check_model_config(args.file)
        print("\n".join(problems) or f"{args.file}: ok")
        return 1 if problems else 0
    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format, secrets_of(settings.redis_url.get_secret_value()))
    if args.command == "acl":
        from llm_pool_worker.permissions import acl_setuser

        print(acl_setuser(settings.prefix, args.user, tuple(args.role or ("worker", "client", "operator"))))
        return 0
    if args.command in ("health", "ready", "models"):
        return probe(settings, args)
    if args.command in ASYNC_COMMANDS:
        return int(uvloop.run(ASYNC_COMMANDS[args.command](settings, args)))
    if args.command == "gateway":
        return serve_gateway(settings, args)
    return run_worker(settings)


def run_worker(settings: Settings) -> int:
    from llm_pool_worker.model_config import ConfigError
    from llm_pool_worker.permissions import AccessRefused
    from llm_pool_worker.supervisor import ForkUnsafe

    try:
        if settings.processes > 1:
            return run_supervised(settings)
        if settings.profile is None:
            uvloop.run(serve(settings))
        else:
            profiled(settings, settings.profile)
    except (ConfigError, AccessRefused, ForkUnsafe) as exc:
        raise UsageError(str(exc)) from None
    return 0
