"""Reading the usage ledger (CONTRACT.md §8): per tenant, per model group, per UTC day."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from llm_pool_contracts import LEDGER_COUNTERS, LEDGER_SEP, Keys

NANO = 1_000_000_000


@dataclass
class UsageRow:
    """One tenant's use of one model group on one UTC day (or a sum of such rows)."""

    tenant_id: str
    day: str
    group: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0  # replies whose token counts were estimated
    cost_nano_usd: int = 0  # exact: billionths of a dollar
    unpriced: int = 0  # replies of deployments without a known price (not in the cost)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def cost_usd(self) -> float:
        return self.cost_nano_usd / NANO

    def add(self, other: UsageRow) -> None:
        for name in LEDGER_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count


def _day(value: str | dt.date | None) -> str | None:
    return value.isoformat() if isinstance(value, dt.date) else value


async def read_usage(
    redis: aioredis.Redis,
    keys: Keys,
    tenant_id: str | None = None,
    since: str | dt.date | None = None,
    until: str | dt.date | None = None,
) -> list[UsageRow]:
    """Ledger rows, one per (tenant, day, group), for ``since`` ≤ day ≤ ``until`` (inclusive)."""
    start, end = _day(since), _day(until)
    head = keys.usage("", "")[:-1]  # "{p}:usage:"
    found = []
    async for raw in redis.scan_iter(match=keys.usage(tenant_id or "*", "*"), count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        tenant, _, day = key[len(head) :].rpartition(":")
        if (tenant_id is None or tenant == tenant_id) and (start is None or day >= start) and (end is None or day <= end):
            found.append((key, tenant, day))
    pipe = redis.pipeline(transaction=False)
    for key, _, _ in found:
        pipe.hgetall(key)
    hashes = cast(list[dict[bytes, bytes]], await pipe.execute()) if found else []
    rows: list[UsageRow] = []
    for (_, tenant, day), counters in zip(found, hashes, strict=True):
        rows += _rows(tenant, day, counters)
    return sorted(rows, key=lambda r: (r.tenant_id, r.day, r.group))


def _rows(tenant: str, day: str, counters: dict[bytes, bytes]) -> list[UsageRow]:
    by_group: dict[str, UsageRow] = {}
    for raw_field, raw_value in counters.items():
        group, _, name = raw_field.decode().rpartition(LEDGER_SEP)
        row = by_group.setdefault(group, UsageRow(tenant, day, group))
        amount = int(raw_value)
        if name.startswith("error:"):
            row.errors[name[6:]] = row.errors.get(name[6:], 0) + amount
        elif name in LEDGER_COUNTERS:
            setattr(row, name, getattr(row, name) + amount)
    return list(by_group.values())


def as_dict(row: UsageRow) -> dict[str, Any]:
    return {"tenant_id": row.tenant_id, "day": row.day, "group": row.group, "requests": row.requests,
            "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens, "estimated": row.estimated,
            "cost_usd": round(row.cost_usd, 9), "unpriced": row.unpriced, "errors": dict(sorted(row.errors.items()))}
