"""The lean stream path: litellm's Router opens a stream, the worker reads its bytes.

litellm spends about a third of a millisecond of CPU on each streamed chunk; parsing the SSE line
once costs a few microseconds. So for deployments that litellm calls through the OpenAI SDK
(OpenAI, and OpenAI-compatible servers: vLLM, Ollama's /v1, ...), a transport under litellm's
HTTP client splits a tagged streaming response in two:

* litellm gets the events up to the first one that carries content, then a synthetic end. Its
  Router therefore chooses the deployment, retries, falls back and cools deployments down exactly
  as for any stream (all of which happens before the first token), and records the attempt.
* the rest of the body is parked under the request's tag, and :func:`read_rest` parses it.

Anything else (other providers, untagged requests, errors) passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import msgspec

from worker.assembly import StreamAssembler

TAP_HEADER = "x-llm-pool-stream"
_TAP_KEY = TAP_HEADER.encode()

# What litellm sees after the head: a finish, so that its stream ends cleanly.
_SYNTHETIC_END = (
    b'data: {"id":"lean","object":"chat.completion.chunk","created":0,"model":"lean",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


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


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, object] | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class StreamBroken(Exception):
    """The provider stream ended without its end, or said it failed, after the head."""


def _has_content(event: _Event) -> bool:
    for choice in event.choices:
        if choice.delta is not None and (choice.delta.content or choice.delta.tool_calls):
            return True
    return False


def _events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE ``data:`` payloads in ``buffer``, and what is left of an unfinished line."""
    lines = buffer.split(b"\n")
    rest = lines.pop()
    return [line[5:].strip() for line in lines if line.startswith(b"data:")], rest


@dataclass
class TappedStream:
    """The body of a streaming response after its head, still being received."""

    rest: bytes
    body: AsyncIterator[bytes]
    response: httpx.Response

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

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # a scan of the raw list: httpx's Headers.get costs more than the rest of this check
        tag = next((value.decode() for key, value in request.headers.raw if key.lower() == _TAP_KEY), None)
        response = await self.inner.handle_async_request(request)
        if tag is None or response.status_code != 200 or "event-stream" not in response.headers.get("content-type", ""):
            return response
        body = aiter(response.stream)  # type: ignore[arg-type]
        buffer, cut = b"", -1
        while cut < 0:
            try:
                data = await anext(body)
            except StopAsyncIteration:
                break
            buffer += data
            cut = self._head_end(buffer)
        if cut < 0:  # the whole answer fitted in the head: litellm reads all of it
            return httpx.Response(200, headers=response.headers, stream=_Head(buffer), extensions=response.extensions)
        await self.discard(tag)  # an earlier attempt of the same call, retried by the Router
        self.parked[tag] = TappedStream(buffer[cut:], body, response)
        self.tapped += 1
        head = buffer[:cut] + _SYNTHETIC_END
        return httpx.Response(200, headers=response.headers, stream=_Head(head), extensions=response.extensions)

    @staticmethod
    def _head_end(buffer: bytes) -> int:
        """Offset just past the first event with content (its closing blank line included),
        or -1 if it has not fully arrived yet."""
        line_start, position = 0, buffer.find(b"\n")
        found = False
        while position >= 0:
            line = buffer[line_start:position].rstrip(b"\r")
            if found and not line:
                return position + 1
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return -1
                try:
                    found = _has_content(_decode_event(payload))
                except msgspec.DecodeError:
                    return -1  # not ours to judge: litellm reads the whole body
            line_start = position + 1
            position = buffer.find(b"\n", line_start)
        return -1


async def read_rest(tapped: TappedStream, answer: StreamAssembler, on_text: Callable[[str], bool]) -> None:
    """Parse the parked body into ``answer``; ``on_text`` sees each text as it arrives, and
    returns True when the event loop should run (a batch of replies is ready to leave).

    Raises :class:`StreamBroken` when the stream does not end properly.
    """
    pending = tapped.rest
    finished = False
    try:
        while True:
            payloads, pending = _events(pending)
            for payload in payloads:
                if payload == b"[DONE]":
                    return
                event = _decode_event(payload)
                if event.error is not None:
                    raise StreamBroken("the provider reported an error mid-stream")
                if event.usage is not None:
                    answer.set_usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                for choice in event.choices:
                    if choice.finish_reason:
                        answer.finish_reason = choice.finish_reason
                        finished = True
                    delta = choice.delta
                    if delta is None:
                        continue
                    if delta.content:
                        answer.add_text(delta.content)
                        if on_text(delta.content):
                            await asyncio.sleep(0)
                    for call in delta.tool_calls or ():
                        fn = call.function
                        answer.add_tool_fragment(call.index, call.id, fn.name if fn else None, fn.arguments if fn else None)
            try:
                pending += await anext(tapped.body)
            except StopAsyncIteration:
                if finished:
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
    """Put a :class:`StreamTap` under the HTTP client litellm gives the OpenAI SDK."""
    import litellm
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, get_ssl_configuration

    # the same transport, TLS settings and proxy mounts litellm would build for the OpenAI SDK
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
    return tap
