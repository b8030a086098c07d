"""Finishing a job: store its outcome, publish it, dead-letter it, acknowledge it, as one unit.

One Lua script does all of it, so Redis takes all of it or none of it (CONTRACT.md §3-4):

* **Fencing.** A worker may have lost its job without knowing (it was paused, or cut off from
  Redis, past its lease), and another worker now runs a later attempt. The script asks the
  pending entry who owns it: if another consumer does, nothing is stored, published or
  acknowledged (``fenced``). If nobody does and an outcome is stored, the job was answered
  elsewhere (``answered``). A stored outcome of a higher attempt is never overwritten
  (``superseded``: the entry is still acknowledged).
* **Tenants.** A stored outcome carries its tenant, and a job of another tenant with the same
  request_id never overwrites it: its refusal is published, not stored.
* **Refused writes.** The writes Redis may refuse when it is out of memory (``SET``, ``XADD``)
  come first, so a refusal leaves nothing half done: the entry stays pending, and the publisher
  tries again later.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from enum import StrEnum

from redis.typing import EncodableT

from llm_pool_contracts import CHUNK_LOG_MAX, Done, Terminal, encode
from llm_pool_worker.inbox import Ack
from llm_pool_worker.ledger import LedgerEntry

# KEYS: jobs stream, result key, dead-letter stream, usage ledger, the tenant's set of running jobs
# (the waiting room's), a resumable job's reply stream. A key not needed is given as the jobs stream again: every key must be a
# name under the prefix, or an ACL user limited to the prefix is refused the whole script.
# ARGV: group, consumer, entry id, attempt, ttl, reply channel, tenant, store ('1' or '0'), payload
# ('' for none), ledger ttl, N, N ledger field/increment values, then (only with a dead letter) the
# dead-letter stream's MAXLEN and MINID, and the dead letter's field/value pairs.
# The writes Redis may refuse for lack of memory (SET, XADD) come before every other write.
FINISH_SCRIPT = f"local LOG_MAX = {CHUNK_LOG_MAX}\n" + """
local jobs, result, dead, ledger, running, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, me, id = ARGV[1], ARGV[2], ARGV[3]
local attempt, ttl, channel, tenant = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local payload = ARGV[9]
local counted = 12 + tonumber(ARGV[11])

local owner = false
local pending = redis.pcall('XPENDING', jobs, group, id, id, 1)
if type(pending) == 'table' and pending[1] then owner = pending[1][2] end
if owner and owner ~= me then return 'fenced' end

local publish = payload ~= ''
local store = publish and ARGV[8] == '1'
if store then
  local current = redis.call('GET', result)
  if current then
    if not owner then
      if current == payload then return 'finished' end  -- ours: a reply lost to a dropped connection, sent again
      return 'answered'
    end
    local ok, old = pcall(cjson.decode, current)
    if ok and type(old) == 'table' then
      if type(old['tenant_id']) == 'string' and old['tenant_id'] ~= tenant then
        store = false  -- another tenant's answer is never overwritten
      elseif tonumber(old['attempt']) and tonumber(old['attempt']) > attempt then
        store, publish = false, false
      end
    end
  end
end
if store then
  redis.call('SET', result, payload, 'EX', ttl)
  if ledger ~= jobs then  -- counted with the stored outcome, so never twice and never lost
    for i = 12, counted - 1, 2 do redis.call('HINCRBY', ledger, ARGV[i], ARGV[i + 1]) end
    redis.call('EXPIRE', ledger, ARGV[10])
  end
end
if #ARGV > counted + 1 then  -- the dead-letter stream is bounded by count and by age
  redis.call('XADD', dead, 'MAXLEN', ARGV[counted], '*', unpack(ARGV, counted + 2))
  redis.call('XTRIM', dead, 'MINID', ARGV[counted + 1])
end
if publish then
  if log ~= jobs then
    redis.call('XADD', log, 'MAXLEN', '~', LOG_MAX, '*', 'm', payload)
    redis.call('EXPIRE', log, ttl)
  end
  redis.call('PUBLISH', channel, payload)
end
if owner then
  redis.call('XACK', jobs, group, id)
  redis.call('XDEL', jobs, id)
  if running ~= jobs then redis.call('ZREM', running, id) end
end
if publish or payload == '' then return 'finished' end
return 'superseded'
"""


class Finish(StrEnum):
    """What became of an outcome."""

    FINISHED = "finished"  # stored, published and acknowledged (or only acknowledged: nothing to store)
    SUPERSEDED = "superseded"  # a higher attempt's outcome was stored already; acknowledged, not stored
    FENCED = "fenced"  # another worker owns the job now: nothing written
    ANSWERED = "answered"  # another worker answered and acknowledged it: nothing written
    ABANDONED = "abandoned"  # the worker stopped before Redis took it: the entry stays pending


DEAD_HEAD_BYTES = 4096  # what is kept of a job over the size limit, with its size and hash


@dataclass(slots=True)
class DeadLetter:
    """An entry of ``{p}:jobs:dead`` (CONTRACT.md §4); Redis stores every field as a string.

    A job over the size limit is not kept whole: its first bytes, its size and its SHA-256 are,
    so that one flood of oversized jobs cannot fill Redis with copies."""

    job: bytes | None
    code: str
    message: str
    attempts: int
    consumer: str
    max_job_bytes: int = 1024 * 1024
    lane: str = "interactive"  # where a replay enqueues it again

    def flat(self) -> list[EncodableT]:
        fields: list[EncodableT] = ["code", self.code, "message", self.message, "attempts", self.attempts,
                                    "consumer", self.consumer, "failed_at_ms", int(time.time() * 1000), "lane", self.lane]
        if self.job is not None and len(self.job) > self.max_job_bytes:
            fields += ["job", self.job[:DEAD_HEAD_BYTES], "job_bytes", len(self.job),
                       "job_sha256", hashlib.sha256(self.job).hexdigest(), "job_truncated", 1]
        elif self.job is not None:
            fields += ["job", self.job]
        return fields


@dataclass(slots=True)
class Outcome:
    """The end of one delivery: the terminal message (or a stored one, sent again unchanged) of
    the attempt that is current, and whether the job goes to the dead letters."""

    ack: Ack
    request_id: str | None  # None: the job's id could not be read, so nobody can be answered
    attempt: int
    message: Terminal | bytes | None
    dead: DeadLetter | None = None
    tenant_id: str | None = None
    store: bool = True  # False: publish only (the id's stored outcome belongs to another tenant)
    ledger: LedgerEntry | None = None  # what the job adds to its tenant's usage, once stored
    log: str = ""  # a resumable job's reply stream, where the terminal message is kept too

    def payload(self, chunks_sent: int) -> bytes:
        message = self.message
        if message is None or isinstance(message, bytes):
            return message or b""
        if isinstance(message, Done):
            message.seq = chunks_sent  # done.seq counts the chunks of its attempt, known only now
        return encode(message)

    def script_args(self, channel: str, ttl_s: int, payload: bytes, dead_bounds: tuple[int, int]) -> list[EncodableT]:
        """ARGV of :data:`FINISH_SCRIPT`; ``dead_bounds``: the dead letters kept at most, and for how many seconds."""
        ack = self.ack
        ledger = self.ledger.flat() if self.ledger is not None else []
        args: list[EncodableT] = [ack.group, ack.consumer, ack.entry_id, self.attempt, ttl_s, channel,
                                  self.tenant_id or "", "1" if self.store else "0", payload,
                                  self.ledger.ttl_s if self.ledger is not None else 0, len(ledger), *ledger]
        if self.dead is not None:
            most, max_age_s = dead_bounds
            args += [most, f"{int((time.time() - max_age_s) * 1000)}-0", *self.dead.flat()]
        return args
