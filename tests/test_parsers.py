"""Byte-level tests of what reads a provider's answer: the line reader, both stream parsers (from
recorded fixtures, cut at every byte), the transport's bounds, usage checks and the error table."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from llm_pool_contracts import ErrorCode
from llm_pool_worker.assembly import AnswerTooLarge, StreamAssembler
from llm_pool_worker.errors import judge
from llm_pool_worker.lean import AnthropicStream, LineReader, OpenAIStream, ProviderFault, StreamBroken, read_rest
from llm_pool_worker.transport import BodyTooLarge, Limits, ProviderTransport, TappedStream, _Bounded, sane_usage

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI = (FIXTURES / "openai_stream.sse").read_bytes()
ANTHROPIC = (FIXTURES / "anthropic_stream.sse").read_bytes()


# ---- lines ----------------------------------------------------------------------------------------


@hsettings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=20),
       crlf=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_lines_come_out_whole_however_the_bytes_are_cut(lines: list[bytes], crlf: bool, cuts: list[int]) -> None:
    data = b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
    reader = LineReader()
    got, start = [], 0
    for cut in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
        got += reader.feed(data[start:cut])
        start = cut
    assert [line for line, _ in got] == lines
    ends, at = [], 0
    for line in lines:
        at += len(line) + (2 if crlf else 1)
        ends.append(at)
    assert [end for _, end in got] == ends, "each line's end offset in the whole stream"


def test_line_reader_is_linear_in_the_bytes_fed() -> None:
    """A line fed one byte at a time is scanned once, not once per byte (that was 7 s for 32 MB)."""
    reader = LineReader()
    for _ in range(200_000):
        assert reader.feed(b"a") == []
    [(line, end)] = reader.feed(b"\n")
    assert len(line) == 200_000 and end == 200_001


# ---- both parsers, from fixtures cut at every byte ---------------------------------------------------


class _Body:
    """A response body arriving in given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        return None


TRANSPORT = ProviderTransport(httpx.AsyncBaseTransport(), Limits(), split=True)


async def parse(pieces: list[bytes], dialect: Any) -> tuple[bytes, StreamAssembler]:
    """What the transport and the lean path make of a stream: the head for litellm, the rest parsed."""
    reader = aiter(_Body(pieces))
    head, rest, cut = await TRANSPORT._head(reader, dialect)
    assert cut is not None, "the head ends at the first event with content"
    answer = StreamAssembler()
    texts: list[str] = []
    await read_rest(TappedStream(rest, reader, _Body([]), dialect), answer, lambda t: texts.append(t) or False)  # type: ignore[arg-type, func-returns-value]
    assert "".join(texts) == answer.content
    return head, answer


def cuts(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


@pytest.mark.parametrize(("fixture", "dialect"), [(OPENAI, OpenAIStream), (ANTHROPIC, AnthropicStream)], ids=["openai", "anthropic"])
async def test_both_parsers_read_a_recorded_stream_cut_anywhere(fixture: bytes, dialect: Any) -> None:
    for pieces in [[fixture], *cuts(fixture), [bytes([b]) for b in fixture]]:
        head, answer = await parse(pieces, dialect())
        assert b'"Hel"' in head and b'"lo"' not in head, "litellm gets the events up to the first token"
        assert answer.content == "lo, world ✓"
        [call] = answer.tool_calls()
        assert (call.id, call.function.name, call.function.arguments) in {
            ("call_1", "get_weather", '{"city": "Oslo"}'), ("toolu_1", "get_weather", '{"city": "Oslo"}')}
        assert answer.finish_reason == "tool_calls"
        assert answer.completion_tokens == 9
        assert answer.prompt_tokens == 12


async def test_an_error_event_mid_stream_breaks_it() -> None:
    cut = OPENAI.index(b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": ", wor"}')
    broken = OPENAI[:cut] + b'data: {"error": {"message": "overloaded"}}\n\n' + OPENAI[cut:]
    with pytest.raises(StreamBroken, match="error"):
        await parse([broken], OpenAIStream())
    anthropic = ANTHROPIC.replace(b'event: message_delta', b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\nevent: message_delta', 1)
    with pytest.raises(StreamBroken, match="error"):
        await parse([anthropic], AnthropicStream())


@pytest.mark.parametrize("damage", [b"data: {not json\n\n", b'data: {"choices": "not a list"}\n\n'])
async def test_an_event_out_of_format_breaks_the_stream(damage: bytes) -> None:
    cut = OPENAI.index(b"data: [DONE]")
    with pytest.raises(StreamBroken, match="format"):
        await parse([OPENAI[:cut] + damage + OPENAI[cut:]], OpenAIStream())


async def test_a_stream_that_ends_before_its_finish_is_broken() -> None:
    with pytest.raises(StreamBroken, match="before its finish"):
        await parse([OPENAI[: OPENAI.index(b'"finish_reason": "tool_calls"') - 100]], OpenAIStream())


async def test_a_stream_of_padding_before_the_first_token_is_refused() -> None:
    padding = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n' * 20_000
    with pytest.raises(ProviderFault, match="before the first token"):
        await parse([padding, OPENAI], OpenAIStream())


# ---- the transport's bounds -----------------------------------------------------------------------


class _Raw:
    def __init__(self, pieces: list[bytes]) -> None:
        self.stream = _Body(pieces)

    async def aclose(self) -> None:
        return None


async def drain(body: _Bounded) -> bytes:
    return b"".join([piece async for piece in body])


def gzipped_pieces(data: bytes, size: int) -> list[bytes]:
    packed = gzip.compress(data)
    return [packed[i : i + size] for i in range(0, len(packed), size)]


async def test_gzip_is_decoded_incrementally() -> None:
    body = _Bounded(_Raw(gzipped_pieces(OPENAI, 7)), "gzip", None, 1024, None)  # type: ignore[arg-type]
    assert await drain(body) == OPENAI


async def test_a_gzip_bomb_stops_at_the_bound() -> None:
    bomb = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    packed = bomb.compress(b"a" * (64 * 1024 * 1024)) + bomb.flush()
    assert len(packed) < 100_000
    with pytest.raises(BodyTooLarge):
        await drain(_Bounded(_Raw([packed]), "gzip", 1024 * 1024, None, None))  # type: ignore[arg-type]


async def test_a_line_over_the_bound_is_refused_as_it_grows() -> None:
    pieces = [b"data: {}\n\n", b"data: " + b"a" * 60_000] + [b"a" * 60_000] * 20
    with pytest.raises(ProviderFault, match="line"):
        await drain(_Bounded(_Raw(pieces), "identity", None, 1024 * 1024, None))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("usage", "sane"),
    [({"prompt_tokens": 3, "completion_tokens": 4}, True), ({"prompt_tokens": -3, "completion_tokens": 4}, False),
     ({"prompt_tokens": "3", "completion_tokens": 4}, False), ({"input_tokens": 10**12, "output_tokens": 1}, False),
     ({"prompt_tokens": True, "completion_tokens": 4}, False)],
)
def test_usage_that_is_not_believable_is_zeroed(usage: dict[str, Any], sane: bool) -> None:
    import json

    payload = json.dumps({"choices": [], "usage": usage}).encode()
    out = json.loads(sane_usage(payload))["usage"]
    assert out == (usage if sane else dict.fromkeys(usage, 0))
    answer = StreamAssembler()  # the lean path's check of the same numbers
    answer.set_usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
    if "prompt_tokens" in usage:
        assert (answer.prompt_tokens == usage["prompt_tokens"]) == sane


def test_an_answer_past_its_bound_raises() -> None:
    answer = StreamAssembler(max_chars=10)
    answer.add_text("0123456789")
    with pytest.raises(AnswerTooLarge):
        answer.add_tool_fragment(0, "c", "f", "x")


# ---- the error table ------------------------------------------------------------------------------


def connection_error_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            raise litellm.APIConnectionError("wrapped", "openai", "m") from None
    except litellm.APIConnectionError as exc:
        exc.__context__ = cause
        return exc


@pytest.mark.parametrize(
    ("exc", "chunks", "code", "restart"),
    [
        (litellm.AuthenticationError("no", "openai", "m"), False, ErrorCode.PROVIDER_AUTH, False),
        (litellm.RateLimitError("slow down", "openai", "m"), False, ErrorCode.RATE_LIMITED, True),
        (litellm.BadRequestError("bad", "m", "openai"), False, ErrorCode.BAD_REQUEST, False),
        (litellm.InternalServerError("boom", "openai", "m"), False, ErrorCode.PROVIDERS_UNAVAILABLE, False),
        (litellm.InternalServerError("boom", "openai", "m"), True, ErrorCode.INTERRUPTED, True),
        (StreamBroken("cut"), True, ErrorCode.INTERRUPTED, True),
        (AnswerTooLarge("big"), True, ErrorCode.ANSWER_TOO_LARGE, False),
        (connection_error_from(TypeError("'int' object is not iterable")), False, ErrorCode.BAD_REQUEST, False),
        (connection_error_from(ConnectionRefusedError()), False, ErrorCode.PROVIDERS_UNAVAILABLE, False),
    ],
    ids=["401", "429", "400", "500", "500-after-chunks", "broken", "too-large", "never-sent", "refused"],
)
def test_the_error_table(exc: BaseException, chunks: bool, code: ErrorCode, restart: bool) -> None:
    verdict = judge(exc, chunks_sent=chunks)
    assert (verdict.code, verdict.restart) == (code, restart)
