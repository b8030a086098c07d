"""Enqueueing on a lane, refused while the lane's backlog is over the operator's limit (CONTRACT.md §1).

The check and the XADD are one script, so that many orchestrator processes cannot all slip in
under the limit at once. The limit is the workers' (``LLM_WORKER_MAX_BACKLOG``,
``LLM_WORKER_MAX_BATCH_BACKLOG``), written to ``{p}:lanes`` when a worker starts; without it,
nothing is refused. The backlog is what no worker has taken yet: the group's lag, or, where
Redis cannot tell it, the stream's length less its pending entries (answered entries are deleted).
"""

from __future__ import annotations

# KEYS: the lane's stream, the lanes hash. ARGV: group, lane, job. Returns {'ok', entry id} or
# {'full', backlog, limit}.
ENQUEUE_SCRIPT = """
local stream, limits = KEYS[1], KEYS[2]
local group, lane, job = ARGV[1], ARGV[2], ARGV[3]
local limit = tonumber(redis.call('HGET', limits, 'max_backlog:' .. lane) or '0') or 0
if limit > 0 then
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  for _, info in ipairs(ok and groups or {}) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then
      local backlog = fields['lag']
      if not backlog then backlog = redis.call('XLEN', stream) - fields['pending'] end
      if backlog >= limit then return {'full', backlog, limit} end
    end
  end
end
return {'ok', redis.call('XADD', stream, '*', 'job', job)}
"""


class QueueFull(Exception):
    """The lane's backlog is at the operator's limit: the job was not enqueued. Retry later, or shed load."""

    def __init__(self, lane: str, backlog: int, limit: int) -> None:
        super().__init__(f"the {lane} lane has {backlog} jobs waiting (limit {limit}); the job was not enqueued")
        self.lane = lane
        self.backlog = backlog
        self.limit = limit
