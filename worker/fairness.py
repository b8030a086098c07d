"""The waiting room: jobs wait per tenant, and free slots take them in turn (CONTRACT.md §1, tenants).

With a ``tenants:`` section in the model config, a lane's stream is only its way in. Workers
read it ahead of their free slots and *park* each job in its tenant's queue
(``{p}:wait:{lane}:{tenant}``, a list, in arrival order), and free slots *take* jobs from the
tenants in turn (``{p}:waiting:{lane}``, tenants by turn), skipping a tenant at its limits: the
most jobs in flight across the pool, requests per minute, tokens per minute. A taken job is added
to the lane's run stream (``{p}:run:{lane}``) and read from it by the taker in the same script,
so from there on it is an ordinary delivery: leased, reclaimed when its worker dies, finished
and acknowledged by the finisher. A tenant with a thousand jobs waiting therefore delays
another tenant's one job by about one job's time, not a thousand.

Both steps are single scripts. Parking acknowledges and deletes the stream entries it parks, so
a job is always in exactly one place: pending in the lane's stream, waiting in a queue, or
pending in the run stream. Taking writes the run stream before it pops the queue, so that a
Redis out of memory refuses the whole step rather than lose the job between the two.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from llm_pool_contracts import Keys
from llm_pool_worker.backoff import REDIS_DOWN, describe
from llm_pool_worker.inbox import Delivery, Inbox
from llm_pool_worker.model_config import TenantLimits

log = structlog.get_logger(__name__)

# KEYS: the lane's stream, the waiting set. ARGV: group, queue prefix, then per entry: id, tenant, deadline_ms, job.
PARK_SCRIPT = """
local stream, waiting = KEYS[1], KEYS[2]
local group, queues = ARGV[1], ARGV[2]
for i = 3, #ARGV, 4 do
  local id, tenant = ARGV[i], ARGV[i + 1]
  redis.call('RPUSH', queues .. tenant, ARGV[i + 2] .. '|' .. ARGV[i + 3])
  redis.call('ZADD', waiting, 'NX', redis.call('INCR', waiting .. ':turn'), tenant)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
return (#ARGV - 2) / 4
"""

# KEYS: the waiting set, the run stream, the limits hash. ARGV: group, consumer, room, now_ms, queue
# prefix, tenant key prefix, lease_ms. Returns the run-stream entries read for this consumer.
TAKE_SCRIPT = """
local waiting, run, limits = KEYS[1], KEYS[2], KEYS[3]
local group, me, room, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local queues, tenants, lease = ARGV[5], ARGV[6], tonumber(ARGV[7])
local minute = math.floor(now / 60000)
local taken, blocked = 0, {}

local function allowed(tenant)
  local spec = redis.call('HGET', limits, tenant) or redis.call('HGET', limits, 'default') or '0 0 0'
  local in_flight, rpm, tpm = string.match(spec, '(%d+) (%d+) (%d+)')
  local running = tenants .. tenant .. ':running'
  redis.call('ZREMRANGEBYSCORE', running, '-inf', now)
  if tonumber(in_flight) > 0 and redis.call('ZCARD', running) >= tonumber(in_flight) then return false end
  if tonumber(rpm) > 0 and tonumber(redis.call('GET', tenants .. tenant .. ':rpm:' .. minute) or '0') >= tonumber(rpm) then return false end
  if tonumber(tpm) > 0 and tonumber(redis.call('GET', tenants .. tenant .. ':tpm:' .. minute) or '0') >= tonumber(tpm) then return false end
  return true
end

local function take(tenant, head)
  local sep = string.find(head, '|', 1, true)
  local id = redis.call('XADD', run, '*', 'job', string.sub(head, sep + 1), 'tenant', tenant)  -- first write: OOM stops here
  redis.call('LPOP', queues .. tenant)
  redis.call('ZADD', tenants .. tenant .. ':running', now + lease, id)
  local rpm_key = tenants .. tenant .. ':rpm:' .. minute
  redis.call('INCR', rpm_key)
  redis.call('EXPIRE', rpm_key, 120)
  taken = taken + 1
end

while taken < room do
  local progress = false
  for _, tenant in ipairs(redis.call('ZRANGE', waiting, 0, -1)) do
    if taken >= room then break end
    local head = redis.call('LINDEX', queues .. tenant, 0)
    if not head then
      redis.call('ZREM', waiting, tenant)
    elseif not blocked[tenant] then
      local deadline = tonumber(string.sub(head, 1, string.find(head, '|', 1, true) - 1))
      if (deadline > 0 and deadline <= now) or allowed(tenant) then  -- past its deadline: taken to be answered expired
        take(tenant, head)
        progress = true
        if redis.call('LLEN', queues .. tenant) == 0 then
          redis.call('ZREM', waiting, tenant)
        else
          redis.call('ZADD', waiting, redis.call('INCR', waiting .. ':turn'), tenant)  -- to the back of the turn
        end
      else
        blocked[tenant] = true
      end
    end
  end
  if not progress then break end
end
if taken == 0 then return {} end
return redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', taken, 'STREAMS', run, '>')
"""


class _TenantOnly(msgspec.Struct):
    tenant_id: str
    deadline_ms: int | None = None


_tenant_decoder = msgspec.json.Decoder(_TenantOnly)


def tenant_of(raw: bytes | None) -> _TenantOnly | None:
    """The tenant and deadline of a raw job, or None when they cannot be read (the job is then run
    at once, to be answered as invalid). Reading two fields costs far less than the whole job."""
    if raw is None:
        return None
    try:
        return _tenant_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def limits_table(tenants: Mapping[str, TenantLimits]) -> dict[str, str]:
    """The limits as the take script reads them: ``"<in flight> <rpm> <tpm>"``, 0 for none."""
    return {name: f"{limits.max_in_flight or 0} {limits.rpm or 0} {limits.tpm or 0}" for name, limits in tenants.items()}


class WaitingRoom:
    """The two steps of one lane's waiting room, for one worker."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, lane: str, consumer: str, lease_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.lane = lane
        self.consumer = consumer
        self.lease_ms = lease_ms
        self.stream = keys.lane(lane)
        self.run_stream = keys.run(lane)
        self._park = redis.register_script(PARK_SCRIPT)
        self._take = redis.register_script(TAKE_SCRIPT)

    async def park(self, entries: list[tuple[bytes, str, int, bytes]]) -> None:
        """Move (entry id, tenant, deadline_ms, raw job) from the lane's stream into the queues."""
        args: list[Any] = [self.keys.group, self.keys.wait(self.lane, "")]
        for entry_id, tenant, deadline_ms, raw in entries:
            args += [entry_id, tenant, deadline_ms, raw]
        await self._park(keys=[self.stream, self.keys.waiting(self.lane)], args=args)

    async def take(self, room: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Up to ``room`` jobs, tenants in turn, each now pending for this worker in the run stream."""
        raw = await self._take(
            keys=[self.keys.waiting(self.lane), self.run_stream, self.keys.tenant_limits],
            args=[self.keys.group, self.consumer, room, int(time.time() * 1000), self.keys.wait(self.lane, ""),
                  f"{self.keys.prefix}:tenant:", self.lease_ms],
        )
        if not raw:
            return []
        [(_stream, entries)] = cast(list[tuple[bytes, list[tuple[bytes, list[bytes]]]]], raw)
        return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in entries]


class ParkingInbox(Inbox):
    """Reads a lane's stream ahead of the free slots and parks each job in its tenant's queue.

    Only what cannot wait is handed out at once: an entry whose tenant cannot be read, to be
    answered as invalid. Entries of dead workers are claimed as usual and run at once (they
    waited their turn already). An entry whose parking failed stays pending for this worker,
    and its own-pending check hands it out to run.
    """

    READAHEAD = 256

    def __init__(self, *args: Any, room: WaitingRoom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.room = room

    def _can_read(self) -> bool:
        return self.may_take()

    async def _read_new(self) -> list[Delivery]:
        entries = await self._fetch(self.READAHEAD)
        now: list[Delivery] = []
        parked: list[tuple[bytes, str, int, bytes]] = []
        for entry_id, fields in entries:
            who = tenant_of(fields.get(b"job"))
            if who is None:
                now.append(self._hand_out(entry_id, fields, 1))
            else:
                parked.append((entry_id, who.tenant_id, who.deadline_ms or 0, fields[b"job"]))
        if parked:
            try:
                await self.room.park(parked)
            except (*REDIS_DOWN, ResponseError) as exc:
                self._check_now = True  # they stay pending here: the own-pending check runs them
                log.warning("could not park jobs; running them as they come", count=len(parked), reason=describe(exc))
            else:
                self.slots.notify()  # wake the takers: of this worker now, of the others at their next look
        return now


class TakingInbox(Inbox):
    """Takes jobs from a lane's waiting room into free slots. Its stream is the lane's run stream,
    so leases, reclaims, lost jobs and the finisher work on it as on any stream."""

    IDLE_LOOK_S = 0.1  # how often a worker with free slots looks into the waiting room
    READ_STEP = "take"

    def __init__(self, *args: Any, room: WaitingRoom, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "stream": room.run_stream})
        self.room = room

    async def _new_entries(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries = await self.room.take(count)
        if not entries:
            await self._wait_for_room(self.IDLE_LOOK_S)  # a park, a freed slot, or the next look
        return entries

    def _running_set(self, fields: dict[bytes, bytes]) -> str:
        tenant = fields.get(b"tenant")
        return self.keys.tenant(tenant.decode(errors="replace")) + "running" if tenant else ""
