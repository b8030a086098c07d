"""The Redis commands each part of the pool runs, and a start-up check that the worker may run its own.

A Redis ACL user for the pool needs only the keys and channels under the prefix and these
commands (README, "Redis permissions"). Lua scripts run their commands as the calling user, so
the commands inside the finish and reclaim scripts are listed too. At start-up one script asks
Redis (``redis.acl_check_cmd``, Redis 7) whether the user may run each of the worker's commands
on the keys and channels it uses, without running any, so that a missing one stops the worker
with one line instead of failing on the first job or the first reclaim.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from llm_pool_contracts import Keys

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: What a worker runs, as ACL spells it (``command|subcommand``).
WORKER_COMMANDS: Final = (
    "get", "set", "mget", "exists", "del", "pexpire", "expire", "hincrby", "hset",
    "xadd", "xtrim", "xreadgroup", "xrange", "xpending", "xclaim", "xack", "xdel",
    "xgroup|create", "xgroup|delconsumer", "xinfo|consumers", "xinfo|groups",
    "publish", "subscribe", "unsubscribe", "evalsha", "script|load",
    "incrbyfloat", "ttl", "ping", "info",  # litellm's router state, shared through Redis
    "rpush", "lpop", "lindex", "llen", "zadd", "zrem", "zrange", "zcard", "zremrangebyscore", "incr", "incrby",
    "multi", "exec",  # the tenants' waiting room
)
#: What an orchestrator's ``LLMClient`` runs (``usage()`` needs scan and hgetall).
CLIENT_COMMANDS: Final = (
    "xadd", "xgroup|create", "get", "set", "publish", "subscribe", "unsubscribe", "scan", "hgetall",
    "evalsha", "script|load", "hget", "xinfo|groups", "xlen",  # the enqueue script's backlog check
    "xrange",  # resume() reads a resumable job's kept replies
)
#: What the operator's commands run (status, health, usage, dead, api-key).
OPERATOR_COMMANDS: Final = (
    "get", "scan", "hgetall", "xlen", "xinfo|groups", "xpending", "xrange", "xrevrange",
    "xadd", "xdel", "xtrim", "del", "multi", "exec", "zrange", "llen",
    "hset", "hkeys", "hdel",  # api-key add, revoke
)
ROLES: Final = {"worker": WORKER_COMMANDS, "client": CLIENT_COMMANDS, "operator": OPERATOR_COMMANDS}


class AccessRefused(Exception):
    """Redis answers but refuses this worker: wrong credentials, or commands or keys it may not use."""


def acl_setuser(prefix: str, user: str, roles: tuple[str, ...]) -> str:
    """The ``ACL SETUSER`` line for a user that may do what ``roles`` do, under ``prefix`` only."""
    commands = sorted({c for role in roles for c in ROLES[role]})
    return (f"ACL SETUSER {user} on >CHANGE-ME resetkeys ~{prefix}:* resetchannels &{prefix}:* "
            "-@all " + " ".join("+" + c for c in commands))


# ARGV: the probes, each as its length and then its words. Returns 1 or 0 per probe.
CHECK_SCRIPT = """
local allowed, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  table.insert(allowed, redis.acl_check_cmd(unpack(ARGV, i + 1, i + n)) and 1 or 0)
  i = i + n + 1
end
return allowed
"""


def _probes(keys: Keys, consumer: str) -> dict[str, tuple[str | int, ...]]:
    """Each command the worker runs, with the keys and channels it runs it on."""
    probe = "permission-probe"
    result, flag, ledger, beat = keys.result(probe), keys.cancel_flag(probe), keys.usage(probe, "1970-01-01"), keys.worker(probe)
    jobs, group, router = keys.jobs, keys.group, f"{keys.prefix}:router:{probe}"
    queue, waiting, running, counter = (keys.wait("interactive", probe), keys.waiting("interactive"),
                                        keys.tenant(probe) + "running", keys.tenant(probe) + "rpm:0")
    return {
        "get": ("GET", result), "set": ("SET", result, "v"), "mget": ("MGET", result, flag),
        "exists": ("EXISTS", beat), "del": ("DEL", beat), "pexpire": ("PEXPIRE", beat, 1000),
        "expire": ("EXPIRE", ledger, 1), "hincrby": ("HINCRBY", ledger, "f", 1),
        "hset": ("HSET", keys.lanes_config, "f", "v"),
        "xadd": ("XADD", keys.dead, "*", "f", "v"), "xtrim": ("XTRIM", keys.dead, "MAXLEN", 1),
        "xreadgroup": ("XREADGROUP", "GROUP", group, consumer, "STREAMS", jobs, ">"),
        "xrange": ("XRANGE", keys.batch, "-", "+"), "xpending": ("XPENDING", jobs, group),
        "xclaim": ("XCLAIM", jobs, group, consumer, 0, "0-1"), "xack": ("XACK", jobs, group, "0-1"),
        "xdel": ("XDEL", jobs, "0-1"), "xgroup|create": ("XGROUP", "CREATE", jobs, group, "0"),
        "xgroup|delconsumer": ("XGROUP", "DELCONSUMER", jobs, group, consumer),
        "xinfo|consumers": ("XINFO", "CONSUMERS", jobs, group), "xinfo|groups": ("XINFO", "GROUPS", jobs),
        "publish": ("PUBLISH", keys.reply(probe), "m"), "subscribe": ("SUBSCRIBE", keys.cancel),
        "unsubscribe": ("UNSUBSCRIBE", keys.cancel),
        "incrbyfloat": ("INCRBYFLOAT", router, 1), "ttl": ("TTL", router), "ping": ("PING",), "info": ("INFO",),
        "rpush": ("RPUSH", queue, "v"), "lpop": ("LPOP", queue), "lindex": ("LINDEX", queue, 0), "llen": ("LLEN", queue),
        "zadd": ("ZADD", waiting, 1, "t"), "zrem": ("ZREM", waiting, "t"), "zrange": ("ZRANGE", waiting, 0, -1),
        "zcard": ("ZCARD", running), "zremrangebyscore": ("ZREMRANGEBYSCORE", running, "-inf", 0),
        "incr": ("INCR", counter), "incrby": ("INCRBY", counter, 1), "multi": ("MULTI",), "exec": ("EXEC",),
    }


async def check_worker_access(redis: aioredis.Redis, keys: Keys, consumer: str) -> None:
    """Raise :class:`AccessRefused` naming every command the worker may not run."""
    probes = _probes(keys, consumer)
    words: list[str | int] = []
    for call in probes.values():
        words += [len(call), *call]
    try:
        sha = await _refused_as("script|load", redis.script_load(CHECK_SCRIPT), keys)
        allowed = await _refused_as("evalsha", redis.evalsha(sha, 0, *words), keys)
    except AuthenticationError as exc:
        raise AccessRefused(f"redis refused the credentials ({exc})") from None
    except ResponseError as exc:
        if "acl_check_cmd" not in str(exc):
            raise
        log.warning("this redis cannot check permissions (redis.acl_check_cmd needs Redis 7); not checked")
        return
    _refuse([name for name, ok in zip(probes, allowed, strict=True) if not ok], keys)


async def _refused_as(name: str, call: Awaitable[T], keys: Keys) -> T:
    """The checking script's own commands: a refusal of either is reported like the others."""
    try:
        return await call
    except NoPermissionError:
        _refuse([name], keys)
        raise


def _refuse(commands: list[str], keys: Keys) -> None:
    if commands:
        raise AccessRefused("the redis user may not run " + ", ".join(c.upper() for c in commands)
                            + f" on {keys.prefix}:* (README: Redis permissions)")
