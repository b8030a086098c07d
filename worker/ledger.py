"""What one finished job adds to its tenant's usage ledger (CONTRACT.md §8).

The increments travel with the outcome into the finisher's script and are added only when the
outcome is stored: a redelivery answered from the store, a fenced or superseded outcome, and a
crash before the store add nothing, so every reply is counted once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from contracts import LEDGER_SEP, Error, Keys, Terminal

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
