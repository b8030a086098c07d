"""A job's replies on their way to an HTTP caller who may hang up at any moment.

Until the first reply comes, nothing is sent, so that a job that fails at once gets a real
status (a 503 when the providers are down) instead of a 200 with an error inside. While
waiting, a caller that hangs up closes the replies, which cancels the job unless it is
resumable (the client's rule). Once streaming, Starlette stops the body when the caller goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import msgspec
from starlette.requests import Request

from llm_pool_client import ReplyTimeout
from llm_pool_contracts import Chunk, Done, Error, ErrorCode, Reply, Result
from llm_pool_gateway.formats import StreamFormat

T = TypeVar("T")


class CallerLeft(Exception):
    """The HTTP caller hung up before the answer was ready."""


async def _hangup(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_hangup(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`CallerLeft` (with ``work`` cancelled) if the caller hangs up first."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_hangup(request))
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise CallerLeft


def _timed_out(exc: ReplyTimeout) -> Error:
    """The client's timeout as an ``error`` reply like the worker's own."""
    return Error(request_id="", attempt=0, code=ErrorCode.TIMEOUT, message=str(exc))


async def first_reply(request: Request, replies: AsyncIterator[Reply]) -> Reply:
    """The first reply; a timeout becomes an ``error`` reply, as later in the stream (:func:`_next`)."""
    reply = await until_hangup(request, _next(replies))
    if reply is None:
        return Error(request_id="", attempt=0, code=ErrorCode.INTERNAL, message="the reply stream ended without an answer")
    return reply


async def stream_body(first: Reply, replies: AsyncIterator[Reply], form: StreamFormat,
                      resumable: bool) -> AsyncIterator[bytes]:
    """The response body from the first reply on. A higher ``attempt`` after text was sent means
    the text so far is void, which no HTTP stream can take back: the stream ends in an
    ``interrupted`` error (a resumable job runs on, and can be re-attached from the new attempt)."""
    attempt, sent = first.attempt, False
    reply: Reply | None = first
    try:
        while reply is not None:
            if reply.attempt > attempt and sent:
                yield form.error(ErrorCode.INTERRUPTED, _restarted(reply.attempt, resumable))
                return
            attempt = reply.attempt
            if isinstance(reply, Chunk):
                sent = True
                yield form.chunk(reply)
            else:
                yield _terminal(reply, form)
                return
            reply = await _next(replies)
    finally:
        await close_replies(replies)


def _terminal(reply: Done | Result | Error, form: StreamFormat) -> bytes:
    if isinstance(reply, Error):
        return form.error(reply.code, reply.message)
    if isinstance(reply, Result):  # a reused request_id answered by a stored whole answer
        return form.done(Done(**msgspec.structs.asdict(reply), seq=0))
    return form.done(reply)


async def _next(replies: AsyncIterator[Reply]) -> Reply | None:
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return None
    except ReplyTimeout as exc:
        return _timed_out(exc)


async def close_replies(replies: AsyncIterator[Reply]) -> None:
    close = getattr(replies, "aclose", None)
    if close is not None:
        await close()


def _restarted(attempt: int, resumable: bool) -> str:
    again = f"; re-attach with after={attempt}:0 for the new attempt's whole text" if resumable else ""
    return f"generation started again (attempt {attempt}) after a provider failure, so the text sent is void{again}"
