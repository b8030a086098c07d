"""The lean stream path: litellm's Router opens a stream, the worker parses its bytes.

litellm spends about half a millisecond of CPU on each streamed chunk; parsing the SSE line once
costs a few microseconds. So the provider transport (``llm_pool_worker.transport``) splits a tagged event
stream after its first event with content: litellm gets that head and a synthetic end, and
:func:`read_rest` parses the rest here. Two wire formats are understood: OpenAI's chat chunks
(OpenAI, vLLM, Ollama's /v1, ...) and Anthropic's message events.

Parsing is linear in the bytes received, whatever the provider sends: lines are split once, as
they complete, and the event loop gets a turn every few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from llm_pool_worker.assembly import StreamAssembler

if TYPE_CHECKING:
    from llm_pool_worker.transport import TappedStream

OnText = Callable[[str], bool]
SLICE_S = 0.002  # the longest a parse runs before the event loop gets a turn


class ProviderFault(httpx.RemoteProtocolError):
    """The provider's answer broke a bound the worker sets: litellm sees a failed call to it."""


class StreamBroken(Exception):
    """The provider stream ended without its end, or said it failed, after the head."""


class LineReader:
    """Complete lines of a byte stream, each found once: linear in the bytes fed, however they are
    cut. The transport bounds how long an unfinished line may grow."""

    __slots__ = ("_pending", "_received")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._received = 0

    def feed(self, data: bytes, offset: int | None = None) -> list[tuple[bytes, int]]:
        """The lines completed by ``data`` (without their line ending), each with the offset just
        past its newline in the whole stream (or past ``offset`` + its position in ``data``)."""
        base = self._received - len(self._pending) if offset is None else offset - len(self._pending)
        self._received += len(data)
        buffer = self._pending
        search = len(buffer)
        buffer += data
        lines: list[tuple[bytes, int]] = []
        start = 0
        newline = buffer.find(b"\n", search)
        while newline != -1:
            end = newline - 1 if newline > start and buffer[newline - 1] == 13 else newline  # \r\n
            lines.append((bytes(buffer[start:end]), base + newline + 1))
            start = newline + 1
            newline = buffer.find(b"\n", start)
        del buffer[:start]  # O(1): a bytearray drops its front without copying
        return lines


# ---- OpenAI chat chunks ----------------------------------------------------------------------


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: Any = None  # checked by the assembler: a provider's numbers are not trusted
    completion_tokens: Any = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, object] | None = None


class OpenAIStream:
    """Parses ``data: {chat.completion.chunk}`` lines, ended by ``data: [DONE]``."""

    synthetic_end = (
        b'data: {"id":"lean","object":"chat.completion.chunk","created":0,"model":"lean",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    _decode = msgspec.json.Decoder(_Chunk).decode

    def __init__(self) -> None:
        self.finished = False

    def head(self, payload: bytes) -> bool:
        """Whether this head event carries content: the head ends with it."""
        if payload == b"[DONE]":
            raise EOFError
        return any(c.delta is not None and (c.delta.content or c.delta.tool_calls) for c in self._decode(payload).choices)

    def begin(self, answer: StreamAssembler) -> None:
        """litellm read the head; what it made of the stream's end was ours, not the provider's."""
        answer.forget_end()

    def feed(self, payload: bytes, answer: StreamAssembler, on_text: OnText) -> tuple[bool, bool]:
        """Apply one event; returns (the stream is over, the event loop should run now)."""
        if payload == b"[DONE]":
            return True, False
        chunk = self._decode(payload)
        if chunk.error is not None:
            raise StreamBroken("the provider reported an error mid-stream")
        if chunk.usage is not None:
            answer.set_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        turn = False
        for choice in chunk.choices:
            if choice.finish_reason:
                answer.finish_reason = choice.finish_reason
                self.finished = True
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                answer.add_text(delta.content)
                turn = on_text(delta.content) or turn
            for call in delta.tool_calls or ():
                fn = call.function
                answer.add_tool_fragment(call.index, call.id, fn.name if fn else None, fn.arguments if fn else None)
        return False, turn


# ---- Anthropic message events ---------------------------------------------------------------

_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                 "refusal": "content_filter"}


class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None


class _BlockDelta(msgspec.Struct):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _AnthropicUsage(msgspec.Struct):
    input_tokens: Any = None  # checked by the assembler
    output_tokens: Any = None


class _Message(msgspec.Struct):
    usage: _AnthropicUsage | None = None


class _AnthropicEvent(msgspec.Struct):
    type: str = ""
    index: int = 0
    content_block: _Block | None = None
    delta: _BlockDelta | None = None
    usage: _AnthropicUsage | None = None
    message: _Message | None = None


@dataclass
class AnthropicStream:
    """Parses Anthropic's ``message_start`` … ``message_stop`` events.

    Tool calls are numbered by the order of their ``tool_use`` blocks, as litellm numbers them.
    """

    synthetic_end = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
        b'"stop_sequence":null},"usage":{"output_tokens":1}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    _decode = msgspec.json.Decoder(_AnthropicEvent).decode

    finished: bool = False
    prompt_tokens: int | None = None
    tools: dict[int, int] = field(default_factory=dict)  # content block index -> tool call index

    def _note(self, event: _AnthropicEvent) -> None:
        if event.type == "message_start" and event.message and event.message.usage:
            self.prompt_tokens = event.message.usage.input_tokens
        elif event.type == "content_block_start" and event.content_block and event.content_block.type == "tool_use":
            self.tools[event.index] = len(self.tools)

    def head(self, payload: bytes) -> bool:
        event = self._decode(payload)
        if event.type == "message_stop":
            raise EOFError
        self._note(event)
        return event.type == "content_block_delta"

    def begin(self, answer: StreamAssembler) -> None:
        answer.forget_end()
        answer.set_usage(self.prompt_tokens, None)

    def feed(self, payload: bytes, answer: StreamAssembler, on_text: OnText) -> tuple[bool, bool]:
        event = self._decode(payload)
        kind = event.type
        if kind == "content_block_delta" and event.delta is not None:
            return False, self._delta(event.index, event.delta, answer, on_text)
        if kind == "content_block_start" and event.content_block is not None:
            self._note(event)
            if event.index in self.tools:
                answer.add_tool_fragment(self.tools[event.index], event.content_block.id, event.content_block.name, None)
        elif kind == "message_delta":
            self._message_delta(event, answer)
        elif kind == "message_stop":
            return True, False
        elif kind == "error":
            raise StreamBroken("the provider reported an error mid-stream")
        return False, False

    def _delta(self, index: int, delta: _BlockDelta, answer: StreamAssembler, on_text: OnText) -> bool:
        if delta.text:
            answer.add_text(delta.text)
            return on_text(delta.text)
        if delta.partial_json and index in self.tools:
            answer.add_tool_fragment(self.tools[index], None, None, delta.partial_json)
        return False

    def _message_delta(self, event: _AnthropicEvent, answer: StreamAssembler) -> None:
        if event.delta is not None and event.delta.stop_reason:
            answer.finish_reason = _STOP_REASONS.get(event.delta.stop_reason, "stop")
            self.finished = True
        if event.usage is not None:
            answer.set_usage(event.usage.input_tokens, event.usage.output_tokens)

Dialect = OpenAIStream | AnthropicStream


def dialect_of(path: str) -> Dialect:
    return AnthropicStream() if path.endswith("/messages") else OpenAIStream()


async def read_rest(tapped: TappedStream, answer: StreamAssembler, on_text: OnText) -> None:
    """Parse the parked body into ``answer``; ``on_text`` sees each text as it arrives, and
    returns True when the event loop should run (a batch of replies is ready to leave).

    Raises :class:`StreamBroken` when the provider fails: the stream ends before its finish, the
    connection fails, an event is not what the format says. A bug of ours propagates as it is.
    """
    dialect = tapped.dialect
    dialect.begin(answer)
    loop = asyncio.get_running_loop()
    turn_at = loop.time() + SLICE_S
    try:
        async with contextlib.aclosing(_payloads(tapped)) as payloads:
            async for payload in payloads:
                try:
                    over, turn = dialect.feed(payload, answer, on_text)
                except msgspec.DecodeError as exc:  # not JSON, or not the format's shape
                    raise StreamBroken("the provider sent an event that is not in its format") from exc
                if over:
                    return
                if turn or loop.time() >= turn_at:
                    await asyncio.sleep(0)  # let the publisher send the batch; never hold the loop long
                    turn_at = loop.time() + SLICE_S
        if not dialect.finished:
            raise StreamBroken("the provider stream ended before its finish")
    finally:
        await tapped.aclose()


async def _payloads(tapped: TappedStream) -> AsyncGenerator[bytes, None]:
    """The ``data:`` payloads of the rest of the stream, as its lines complete."""
    lines = LineReader()
    data = tapped.rest
    while True:
        for line, _ in lines.feed(data):
            if line.startswith(b"data:"):
                yield line[5:].strip()
        try:
            data = await anext(tapped.body)
        except StopAsyncIteration:
            return
        except ProviderFault as exc:
            raise StreamBroken(str(exc)) from exc
        except (OSError, httpx.HTTPError) as exc:  # connection reset, read timeout
            raise StreamBroken(f"the provider connection failed mid-stream ({type(exc).__name__})") from exc
