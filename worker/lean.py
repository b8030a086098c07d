"""The lean stream path: litellm's Router opens a stream, the worker reads its bytes.

litellm spends about half a millisecond of CPU on each streamed chunk; parsing the SSE line once
costs a few microseconds. So a transport under litellm's HTTP clients (the one it gives the
OpenAI SDK, and its own module-level client, which the Anthropic handler streams through) splits
a tagged streaming response in two:

* litellm gets the events up to the first one that carries content, then a synthetic end. Its
  Router therefore chooses the deployment, retries, falls back and cools deployments down exactly
  as for any stream (all of which happens before the first token), and records the attempt.
* the rest of the body is parked under the request's tag, and :func:`read_rest` parses it.

Two wire formats are understood: OpenAI's chat chunks (OpenAI, vLLM, Ollama's /v1, ...) and
Anthropic's message events. Anything else (other providers, untagged requests, errors) passes
through untouched and stays on litellm's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from worker.assembly import StreamAssembler

TAP_HEADER = "x-llm-pool-stream"
_TAP_KEY = TAP_HEADER.encode()

OnText = Callable[[str], bool]


class StreamBroken(Exception):
    """The provider stream ended without its end, or said it failed, after the head."""


def _payloads(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE ``data:`` payloads in ``buffer``, and what is left of an unfinished line."""
    lines = buffer.split(b"\n")
    rest = lines.pop()
    return [line[5:].strip() for line in lines if line.startswith(b"data:")], rest


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
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


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
    input_tokens: int | None = None
    output_tokens: int | None = None


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


def dialect_of(request: httpx.Request) -> Dialect:
    return AnthropicStream() if request.url.path.endswith("/messages") else OpenAIStream()


# ---- the tap ------------------------------------------------------------------------------


@dataclass
class TappedStream:
    """The body of a streaming response after its head, still being received."""

    rest: bytes
    body: AsyncIterator[bytes]
    response: httpx.Response
    dialect: Dialect

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.response.aclose()


class _Head(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


class StreamTap(httpx.AsyncBaseTransport):
    """Wraps litellm's own transport; splits tagged event streams, passes everything else."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.parked: dict[str, TappedStream] = {}
        self.tapped = 0  # streams split so far, for tests and metrics

    def take(self, tag: str) -> TappedStream | None:
        return self.parked.pop(tag, None)

    async def discard(self, tag: str) -> None:
        """Close a body nobody will read (the call failed after the head was parked)."""
        tapped = self.parked.pop(tag, None)
        if tapped is not None:
            await tapped.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # a scan of the raw list: httpx's Headers.get costs more than the rest of this check
        tag = next((value.decode() for key, value in request.headers.raw if key.lower() == _TAP_KEY), None)
        response = await self.inner.handle_async_request(request)
        if tag is None or response.status_code != 200 or "event-stream" not in response.headers.get("content-type", ""):
            return response
        body = aiter(response.stream)  # type: ignore[arg-type]
        buffer, cut = b"", -1
        while cut == -1:
            try:
                data = await anext(body)
            except StopAsyncIteration:
                break
            buffer += data
            dialect = dialect_of(request)  # the head is read again from its start: a fresh parser
            cut = self._head_end(buffer, dialect)
        if cut < 0:  # the whole answer fitted in the head, or it is not ours to judge: litellm reads it all
            return httpx.Response(200, headers=response.headers, stream=_Head(buffer), extensions=response.extensions)
        await self.discard(tag)  # an earlier attempt of the same call, retried by the Router
        self.parked[tag] = TappedStream(buffer[cut:], body, response, dialect)
        self.tapped += 1
        head = buffer[:cut] + dialect.synthetic_end
        return httpx.Response(200, headers=response.headers, stream=_Head(head), extensions=response.extensions)

    @staticmethod
    def _head_end(buffer: bytes, dialect: Dialect) -> int:
        """Offset just past the first event with content (its closing blank line included);
        -1 if it has not fully arrived yet, -2 if the stream is not to be split."""
        line_start, position = 0, buffer.find(b"\n")
        found = False
        while position >= 0:
            line = buffer[line_start:position].rstrip(b"\r")
            if found and not line:
                return position + 1
            if line.startswith(b"data:"):
                try:
                    found = dialect.head(line[5:].strip())
                except (EOFError, msgspec.DecodeError):
                    return -2
            line_start = position + 1
            position = buffer.find(b"\n", line_start)
        return -1


async def read_rest(tapped: TappedStream, answer: StreamAssembler, on_text: OnText) -> None:
    """Parse the parked body into ``answer``; ``on_text`` sees each text as it arrives, and
    returns True when the event loop should run (a batch of replies is ready to leave).

    Raises :class:`StreamBroken` when the stream does not end properly.
    """
    dialect = tapped.dialect
    dialect.begin(answer)
    pending = tapped.rest
    try:
        while True:
            payloads, pending = _payloads(pending)
            for payload in payloads:
                over, turn = dialect.feed(payload, answer, on_text)
                if over:
                    return
                if turn:
                    await asyncio.sleep(0)  # let the publisher send the batch this text started
            try:
                pending += await anext(tapped.body)
            except StopAsyncIteration:
                if dialect.finished:
                    return
                raise StreamBroken("the provider stream ended before its finish") from None
    except StreamBroken:
        raise
    except msgspec.DecodeError as exc:
        raise StreamBroken("the provider sent an event that is not JSON") from exc
    except Exception as exc:  # the transport's own errors: connection reset, read timeout, ...
        raise StreamBroken(f"the provider connection failed mid-stream ({type(exc).__name__})") from exc
    finally:
        await tapped.aclose()


def install_tap() -> StreamTap:
    """Put one :class:`StreamTap` under the HTTP clients litellm streams through: the one it gives
    the OpenAI SDK, and its module-level client (Anthropic's handler)."""
    import litellm
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, get_ssl_configuration

    # the same transport, TLS settings and proxy mounts litellm would build itself
    ssl_config = get_ssl_configuration()
    inner = AsyncHTTPHandler.create_async_transport(
        ssl_context=ssl_config if isinstance(ssl_config, ssl.SSLContext) else None,
        ssl_verify=ssl_config if isinstance(ssl_config, bool) else None,
    )
    tap = StreamTap(inner or httpx.AsyncHTTPTransport())
    litellm.aclient_session = httpx.AsyncClient(
        verify=ssl_config,
        transport=tap,
        mounts=AsyncHTTPHandler.create_httpx_proxy_mounts(inner, verify=ssl_config, cert=None),
        follow_redirects=True,
    )
    litellm.module_level_aclient = AsyncHTTPHandler(transport=tap, ssl_verify=ssl_config)
    return tap
