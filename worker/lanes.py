"""Two lanes of work, interactive and batch, sharing one worker's slots (CONTRACT.md §1, lanes).

Each lane is a stream of its own with its own inbox. Free slots go to the interactive lane first;
the batch lane is still owed a minimum share of the slots whenever it has work waiting, so that
a steady flow of chat replies never starves it, and it may take every free slot while the
interactive lane has nothing waiting. Nothing is pre-empted: a slot is given up only when its
job ends.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import AsyncIterator
from typing import TypeVar

from llm_pool_contracts import Keys

T = TypeVar("T")


class Lane(enum.StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"

    def stream(self, keys: Keys) -> str:
        return keys.lane(self.value)


class Slots:
    """One count of a worker's job slots, shared by its lanes' inboxes."""

    def __init__(self, total: int, batch_share: float) -> None:
        self.total = total
        self.batch_share = max(1, math.ceil(total * batch_share)) if batch_share > 0 else 0
        self.held = dict.fromkeys(Lane, 0)
        self.waiting = dict.fromkeys(Lane, True)  # has the lane work no worker has taken? (until a read tells)
        self._watchers: list[asyncio.Event] = []

    @property
    def in_use(self) -> int:
        return sum(self.held.values())

    def free_for(self, lane: Lane) -> int:
        free = self.total - self.in_use
        owed = max(0, self.batch_share - self.held[Lane.BATCH])  # what batch may still claim of its share
        if lane is Lane.INTERACTIVE:
            return max(0, free - owed) if self.waiting[Lane.BATCH] else free
        return free if not self.waiting[Lane.INTERACTIVE] else min(free, owed)

    def take(self, lane: Lane) -> None:
        self.held[lane] += 1

    def give_back(self, lane: Lane) -> None:
        self.held[lane] -= 1
        self.notify()

    def saw(self, lane: Lane, asked: int, got: int) -> None:
        """A read of ``lane`` for ``asked`` entries returned ``got``: it has more only if it filled the ask."""
        self.set_waiting(lane, got >= asked > 0)

    def set_waiting(self, lane: Lane, waiting: bool) -> None:
        if self.waiting[lane] != waiting:
            self.waiting[lane] = waiting
            self.notify()  # the other lane's share changed

    def watch(self) -> asyncio.Event:
        event = asyncio.Event()
        self._watchers.append(event)
        return event

    def notify(self) -> None:
        for event in self._watchers:
            event.set()


async def merged(sources: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several iterators as each comes; ends when all have ended, and raises what
    any of them raised."""
    queue: asyncio.Queue[tuple[T | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put((item, None, False))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((None, exc, True))
        else:
            await queue.put((None, None, True))

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    remaining = len(tasks)
    try:
        while remaining:
            item, error, ended = await queue.get()
            if error is not None:
                raise error
            if ended:
                remaining -= 1
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
