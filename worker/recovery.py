"""Takes over the jobs of dead workers (CONTRACT.md §4).

Recovery is lease-based: a consumer whose liveness key (§6) is gone is dead, and its pending
entries are claimed by a live worker. Checking the key and claiming happen in one Lua script,
so no worker claims from a consumer that is alive at that moment, and a live worker's jobs are
never taken from it however long they run. Dead consumers with nothing pending are removed from
the group, so that restarted pods leave no ghosts.

As a last resort, an entry idle for longer than any job may run (a bound well above the job
time limit) is claimed whatever its owner: its worker cannot still be working on it.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
import structlog

from llm_pool_contracts import Keys

log = structlog.get_logger(__name__)

# KEYS: stream. ARGV: group, me, liveness key prefix, how many to claim, last-resort idle ms.
# Returns {claimed, removed}: claimed is a list of {id, fields, deliveries before this claim}.
RECLAIM_SCRIPT = """
local stream, group, me, prefix = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local room = tonumber(ARGV[4])
local stale_ms = tonumber(ARGV[5])
local claimed, removed = {}, {}

local function take(id, deliveries)
  local got = redis.call('XCLAIM', stream, group, me, 0, id)
  if got[1] then
    table.insert(claimed, {id, got[1][2], deliveries})
    room = room - 1
  end
end

local function forget(name)
  redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
  table.insert(removed, name)
end

for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local name, pending
  for i = 1, #info, 2 do
    if info[i] == 'name' then name = info[i + 1] elseif info[i] == 'pending' then pending = info[i + 1] end
  end
  if name ~= me and redis.call('EXISTS', prefix .. name) == 0 then
    if pending > 0 and room > 0 then
      local entries = redis.call('XPENDING', stream, group, '-', '+', room, name)
      for _, e in ipairs(entries) do take(e[1], e[4]) end
      pending = pending - #entries
    end
    if pending == 0 then forget(name) end
  end
end

if room > 0 and stale_ms > 0 then
  for _, e in ipairs(redis.call('XPENDING', stream, group, 'IDLE', stale_ms, '-', '+', room)) do
    if e[2] ~= me then take(e[1], e[4]) end
  end
end
return {claimed, removed}
"""

ClaimedEntry = tuple[bytes, dict[bytes, bytes], int]


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Reclaimer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str, stale_after_s: float, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.keys = keys
        self.consumer = consumer
        self.stale_after_ms = int(stale_after_s * 1000)
        self._script = redis.register_script(RECLAIM_SCRIPT)

    async def claim(self, room: int) -> list[ClaimedEntry]:
        """Claim up to ``room`` entries of dead consumers; returns (id, fields, earlier deliveries)."""
        raw = cast(
            list[Any],
            await self._script(
                keys=[self.stream],
                args=[self.keys.group, self.consumer, self.keys.worker(""), max(0, room), self.stale_after_ms],
            ),
        )
        claimed, removed = raw
        if removed:
            log.info("removed dead consumers with nothing pending", consumers=[r.decode() for r in removed])
        entries = [(entry_id, _pairs(fields), int(deliveries)) for entry_id, fields, deliveries in claimed]
        if entries:
            log.warning("reclaimed jobs of dead workers", count=len(entries))
        return entries

