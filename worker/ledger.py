"""What one finished job adds to its tenant's usage ledger (CONTRACT.md §8).

The increments travel with the outcome into the finisher's script and are added only when the
outcome is stored: a redelivery answered from the store, a fenced or superseded outcome, and a
crash before the store add nothing, so every reply is counted once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_pool_contracts import LEDGER_SEP, Error, Keys, Terminal

NANO = 1_000_000_000


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    key: str
    ttl_s: int
    increments: dict[str, int]

    def flat(self) -> list[str | int]:
        return [value for field, amount in self.increments.items() for value in (field, amount)]


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


def ledger_entry(keys: Keys, tenant_id: str, group: str, message: Terminal, retention_days: int) -> LedgerEntry:
    counts: dict[str, int] = {"requests": 1}
    if isinstance(message, Error):
        counts[f"error:{message.code}"] = 1
    else:
        counts["prompt_tokens"] = message.usage.prompt_tokens
        counts["completion_tokens"] = message.usage.completion_tokens
        counts["estimated"] = int(message.usage.estimated)
        if message.cost_usd is None:
            counts["unpriced"] = 1
        else:
            counts["cost_nano_usd"] = round(message.cost_usd * NANO)
    increments = {f"{group}{LEDGER_SEP}{name}": amount for name, amount in counts.items() if amount}
    return LedgerEntry(keys.usage(tenant_id, utc_day()), retention_days * 86_400, increments)


async def over_budget(redis: Any, keys: Keys, budgets: Mapping[str, float]) -> dict[str, str]:
    """The tenants among ``budgets`` that spent their daily budget today (UTC), by the ledger,
    each with the message its jobs are refused with. One round trip for all of them."""
    if not budgets:
        return {}
    day = utc_day()
    pipe = redis.pipeline(transaction=False)
    for tenant in budgets:
        pipe.hgetall(keys.usage(tenant, day))
    over = {}
    for (tenant, budget), fields in zip(budgets.items(), await pipe.execute(), strict=True):
        nano = sum(int(v) for k, v in fields.items() if k.decode().endswith(LEDGER_SEP + "cost_nano_usd"))
        if nano >= round(budget * NANO):
            over[tenant] = f"tenant {tenant} has spent ${nano / NANO:.4f} today (UTC {day}), its daily budget is ${budget:g}"
    return over
