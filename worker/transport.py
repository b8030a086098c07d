"""The HTTP transport under litellm's clients: every OpenAI-format and Anthropic response passes here.

It sits under the client litellm gives the OpenAI SDK and under its module-level client (the one
Anthropic's handler uses), and guards the worker against a provider, or a proxy in front of it,
that answers badly, before litellm or the lean path spend anything on the answer:

* Bodies are decompressed here, incrementally, and a whole answer's body never grows past its
  bound: a gzip bomb stops at the bound, and the call ends ``answer_too_large``.
* A line of an event stream never grows past its bound, and no more than a bounded number of
  bytes and events may come before the first token: a stream of padding fails the deployment.
* A streaming call answered 200 with something that is not a stream (an HTML error page) becomes
  an HTTP 502, so that litellm counts the deployment as failing and moves on.
* The work done per read is bounded: the head is parsed once, event by event, in linear time,
  and the event loop gets a turn every few milliseconds.
* With lean streams on, an event stream is split after its first event with content: litellm
  gets that head and a synthetic end (so its Router chooses, retries, falls back and cools
  down as for any stream), and the rest is parked for :func:`worker.lean.read_rest`.

Each call is tagged by the router with a header that the transport reads and removes, so that the
router can ask afterwards what happened to its call: whether a request left at all, whether the
answer was too large, and where the rest of its stream is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec

from llm_pool_worker.assembly import token_count
from llm_pool_worker.lean import Dialect, LineReader, ProviderFault, dialect_of
from llm_pool_worker.settings import Settings

CALL_HEADER = "x-llm-pool-call"
_CALL_KEY = CALL_HEADER.encode()
_DECODE_STEP = 64 * 1024  # most bytes one step of decompression may produce
_STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/json")
SLICE_S = 0.002  # the longest the transport parses before the event loop gets a turn


class BodyTooLarge(ProviderFault):
    """A whole answer's body grew past its bound; the router reports it as ``answer_too_large``."""


@dataclass(frozen=True, slots=True)
class Limits:
    answer_chars: int = 1_000_000  # text plus tool arguments of one answer
    line_bytes: int = 1024 * 1024  # one line of an event stream
    head_bytes: int = 1024 * 1024  # bytes before the first token
    head_events: int = 10_000  # events before the first token

    @property
    def body_bytes(self) -> int:
        """A whole answer's decoded body: the answer's characters in UTF-8 and JSON escapes, and room for the rest."""
        return 4 * self.answer_chars + 64 * 1024


def limits_of(settings: Settings) -> Limits:
    return Limits(answer_chars=settings.max_answer_chars, line_bytes=settings.max_event_bytes)


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


@dataclass
class CallRecord:
    """What the transport saw of one tagged call (all attempts the Router made for it)."""

    sent: int = 0
    too_large: bool = False
    split: bool = False  # litellm got a head and a synthetic end: the rest must be read from `parked`
    parked: TappedStream | None = None
    streams: list[httpx.Response] = field(default_factory=list)  # closed when the call is over


@dataclass
class _Decoder:
    """Incremental gzip/deflate decoding that never produces more than a step per call."""

    encoding: str
    zobj: zlib._Decompress | None = field(default=None)

    def __post_init__(self) -> None:
        if self.encoding == "gzip":
            self.zobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.encoding == "deflate":
            self.zobj = zlib.decompressobj()

    def pieces(self, data: bytes) -> list[bytes]:
        if self.zobj is None:
            return [data]
        try:
            out = [self.zobj.decompress(data, _DECODE_STEP)]
            while self.zobj.unconsumed_tail:
                out.append(self.zobj.decompress(self.zobj.unconsumed_tail, _DECODE_STEP))
        except zlib.error as exc:
            raise ProviderFault(f"the provider's {self.encoding} body is corrupt") from exc
        return out


class _Bounded(httpx.AsyncByteStream):
    """A response body, decoded, with its bounds enforced as it is read."""

    def __init__(
        self, raw: httpx.Response, encoding: str, max_total: int | None, max_line: int | None, record: CallRecord | None
    ) -> None:
        self.raw = raw
        self.decoder = _Decoder(encoding)
        self.max_total = max_total
        self.max_line = max_line
        self.record = record
        self.total = 0
        self.line = 0  # bytes of the line still open

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self.raw.stream:  # type: ignore[union-attr]
            for piece in self.decoder.pieces(data):
                if piece:
                    self._check(piece)
                    yield piece

    def _check(self, piece: bytes) -> None:
        self.total += len(piece)
        if self.max_total is not None and self.total > self.max_total:
            if self.record is not None:
                self.record.too_large = True  # a retry of this call fails before it is sent
            raise BodyTooLarge(f"the answer's body is over {self.max_total} bytes")
        if self.max_line is None:
            return
        first = piece.find(b"\n")
        if first == -1:
            self.line += len(piece)
        elif self.line + first > self.max_line:
            self.line += first
        else:  # lines inside one piece are shorter than the piece, which is at most a read or a decoding step
            self.line = len(piece) - piece.rfind(b"\n") - 1
        if self.line > self.max_line:
            raise ProviderFault(f"an event line of the stream is over {self.max_line} bytes")

    async def aclose(self) -> None:
        await self.raw.aclose()


_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens")


def sane_usage(payload: bytes) -> bytes:
    """The JSON payload with its usage counts zeroed if any is not believable (negative, a string,
    absurd): litellm's Router fails on a negative count, and the worker then estimates the usage
    and marks it so, instead of passing garbage to a ledger."""
    if b'"usage"' not in payload:
        return payload
    try:
        data = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return payload
    fixed = [_zero_bad_counts(u) for u in _usages(data)]
    return msgspec.json.encode(data) if any(fixed) else payload


def _usages(data: object) -> list[dict[str, object]]:
    """Usage objects where OpenAI and Anthropic put them: at the top, or in ``message``."""
    found = []
    for holder in (data, data.get("message") if isinstance(data, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            found.append(holder["usage"])
    return found


def _zero_bad_counts(usage: dict[str, object]) -> bool:
    if all(token_count(usage[k]) is not None for k in _COUNTS if k in usage):
        return False
    for key in _COUNTS:
        if key in usage:
            usage[key] = 0
    return True


def _sane_lines(block: bytes) -> bytes:
    """Complete event-stream lines, their usage made sane (see :func:`sane_usage`)."""
    if b'"usage"' not in block:
        return block
    lines = block.split(b"\n")
    return b"\n".join(b"data: " + sane_usage(line[5:].strip()) if line.startswith(b"data:") else line for line in lines)


async def _sane_stream(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An event stream for litellm: whole lines only, their usage made sane."""
    pending = b""
    async for data in source:
        cut = data.rfind(b"\n")
        if cut == -1:
            pending += data
            continue
        yield _sane_lines(pending + data[: cut + 1])
        pending = data[cut + 1 :]
    if pending:
        yield _sane_lines(pending)


class _Replay(httpx.AsyncByteStream):
    """What was read of a body already, then the rest of it. Closing it closes the connection only
    if it owns it: a split head does not, the parked rest does."""

    def __init__(self, head: bytes, rest: AsyncIterator[bytes] | None, source: _Bounded | None) -> None:
        self.head = head
        self.rest = rest
        self.source = source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            yield self.head
        if self.rest is not None:
            async for data in self.rest:
                yield data

    async def aclose(self) -> None:
        if self.source is not None:
            await self.source.aclose()


class ProviderTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, limits: Limits, split: bool) -> None:
        self.inner = inner
        self.limits = limits
        self.split = split  # lean streams: park the rest of an event stream after its head
        self.calls: dict[str, CallRecord] = {}
        self.split_count = 0  # streams split so far, for tests and metrics

    # ---- what the router asks --------------------------------------------------------------------

    def record(self, tag: str) -> CallRecord:
        return self.calls.get(tag) or CallRecord()

    def take(self, tag: str) -> TappedStream | None:
        record = self.calls.get(tag)
        if record is None or record.parked is None:
            return None
        parked, record.parked = record.parked, None
        return parked

    async def forget(self, tag: str) -> None:
        """The call is over: close a parked body nobody will read, and any stream litellm left open
        (one that ended early on its path, if this litellm's wrapper cannot be closed), and drop the record."""
        record = self.calls.pop(tag, None)
        if record is None:
            return
        if record.parked is not None:
            await record.parked.aclose()
        for response in record.streams:  # closing a closed response is a no-op
            with contextlib.suppress(Exception):
                await response.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()

    # ---- one request -------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        tag, streaming = self._read_tag(request)
        record = self.calls.setdefault(tag, CallRecord()) if tag else None
        if record is not None and record.too_large:
            raise BodyTooLarge("the answer was too large already: not asking again")  # no second paid call
        request.headers["accept-encoding"] = "gzip, deflate"  # the encodings decoded here, within bounds
        response = await self.inner.handle_async_request(request)
        if record is not None:
            record.sent += 1
            if streaming:
                record.streams.append(response)
        if response.status_code != 200:
            return response
        content_type = response.headers.get("content-type", "")
        if streaming and not content_type.startswith(_STREAM_TYPES):
            await response.aclose()
            return _bad_gateway(request, f"a stream was asked for and the provider sent {content_type or 'no type'}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate"):
            return response  # an encoding asked for by someone else: httpx decodes it, unbounded
        event_stream = content_type.startswith("text/event-stream")
        body = _Bounded(response, encoding, None if streaming else self.limits.body_bytes,
                        self.limits.line_bytes if event_stream else None, record)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in (b"content-encoding", b"content-length")]
        if streaming and event_stream:
            return await self._stream(request, response, body, headers, record)
        if content_type.startswith("application/json"):  # a whole answer: read it (within bounds) to check its usage
            whole = sane_usage(b"".join([piece async for piece in body]))
            await body.aclose()
            return httpx.Response(200, headers=headers, content=whole, extensions=response.extensions, request=request)
        return httpx.Response(200, headers=headers, stream=body, extensions=response.extensions, request=request)

    @staticmethod
    def _read_tag(request: httpx.Request) -> tuple[str | None, bool]:
        """The router's tag and whether the call streams; the header never reaches the provider."""
        # a scan of the raw list: httpx's Headers.get costs more than the rest of this check
        value = next((v.decode() for k, v in request.headers.raw if k.lower() == _CALL_KEY), None)
        if value is None:
            return None, False
        del request.headers[CALL_HEADER]
        tag, _, mode = value.partition(" ")
        return tag, mode == "stream"

    async def _stream(
        self,
        request: httpx.Request,
        response: httpx.Response,
        body: _Bounded,
        headers: list[tuple[bytes, bytes]],
        record: CallRecord | None,
    ) -> httpx.Response:
        dialect = dialect_of(request.url.path)
        reader = aiter(body)
        head, rest, cut = await self._head(reader, dialect)
        if cut is None or not self.split or record is None:
            tail = _sane_stream(reader) if cut is not None else None
            return httpx.Response(200, headers=headers, stream=_Replay(_sane_lines(head + rest), tail, body),
                                  extensions=response.extensions, request=request)
        if record.parked is not None:
            await record.parked.aclose()  # an earlier attempt of the same call, retried by the Router
        record.parked = TappedStream(rest, reader, response, dialect)
        record.split = True
        self.split_count += 1
        return httpx.Response(200, headers=headers, stream=_Replay(_sane_lines(head) + dialect.synthetic_end, None, None),
                              extensions=response.extensions, request=request)

    async def _head(self, reader: AsyncIterator[bytes], dialect: Dialect) -> tuple[bytes, bytes, int | None]:
        """Read up to the end of the first event with content: (head, what came after it, where it
        was cut); cut is None when the whole body came first, or the stream is not ours to judge."""
        lines = LineReader()
        received = bytearray()
        events, found = 0, False
        loop = asyncio.get_running_loop()
        turn_at = loop.time() + SLICE_S
        async for data in reader:
            offset = len(received)
            received += data
            for line, end in lines.feed(data, offset):
                if found and not line:
                    return bytes(received[:end]), bytes(received[end:]), end
                if not line.startswith(b"data:"):
                    continue
                events += 1
                try:
                    found = dialect.head(line[5:].strip()) or found
                except (EOFError, msgspec.DecodeError):
                    return bytes(received), b"", None
                if loop.time() >= turn_at:
                    await asyncio.sleep(0)
                    turn_at = loop.time() + SLICE_S
            self._bound_head(len(received), events, found)
        return bytes(received), b"", None

    def _bound_head(self, size: int, events: int, found: bool) -> None:
        if found:
            return
        if size > self.limits.head_bytes:
            raise ProviderFault(f"over {self.limits.head_bytes} bytes before the first token")
        if events > self.limits.head_events:
            raise ProviderFault(f"over {self.limits.head_events} events before the first token")


def _bad_gateway(request: httpx.Request, reason: str) -> httpx.Response:
    body = msgspec.json.encode({"error": {"message": reason, "type": "bad_gateway", "code": 502}})
    return httpx.Response(502, headers={"content-type": "application/json"}, content=body, request=request)


def install_transport(limits: Limits, split: bool) -> ProviderTransport:
    """Put one :class:`ProviderTransport` under the HTTP clients litellm calls providers through:
    the one it gives the OpenAI SDK, and its module-level client (Anthropic's handler). Call it
    after ``litellm_settings`` are applied, so that their TLS settings reach it."""
    import litellm
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, get_ssl_configuration

    # the same transport, TLS settings and proxy mounts litellm would build itself
    ssl_config = get_ssl_configuration()
    inner = AsyncHTTPHandler.create_async_transport(
        ssl_context=ssl_config if isinstance(ssl_config, ssl.SSLContext) else None,
        ssl_verify=ssl_config if isinstance(ssl_config, bool) else None,
    )
    transport = ProviderTransport(inner or httpx.AsyncHTTPTransport(verify=ssl_config), limits, split)
    litellm.aclient_session = httpx.AsyncClient(
        verify=ssl_config,
        transport=transport,
        mounts=AsyncHTTPHandler.create_httpx_proxy_mounts(inner, verify=ssl_config, cert=None),
        follow_redirects=True,
    )
    litellm.module_level_aclient = AsyncHTTPHandler(transport=transport, ssl_verify=ssl_config)
    return transport
