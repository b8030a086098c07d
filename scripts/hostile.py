"""The stand-in model's hostile modes: a provider, or a proxy in front of it, that answers badly.

Directives (in the prompt), OpenAI format, streamed or not:

* ``#html``: 200 OK with an HTML page, as a misconfigured proxy sends.
* ``#gzip``: the answer gzip-compressed; a stream is flushed frame by frame, as a real one is.
* ``#bomb=MB``: a whole answer of MB mebibytes of text, gzip-compressed (about 1 KiB per MiB on the wire).
* ``#hugeline=MB``: a stream whose second event is one line of MB mebibytes, with no newline.
* ``#padding=N``: a stream with N events without content before the first token.
* ``#negusage``, ``#strusage``: usage numbers that are negative, or strings.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

MIB = 1024 * 1024


def _usage(plan: Any) -> dict[str, Any]:
    prompt, completion = plan.prompt_tokens, len(plan.tokens) or 1
    if "negusage" in plan.hostile:
        return {"prompt_tokens": -prompt, "completion_tokens": -1_000_000, "total_tokens": -1}
    if "strusage" in plan.hostile:
        return {"prompt_tokens": str(prompt), "completion_tokens": str(completion), "total_tokens": "many"}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": int(time.time()), "model": "hostile",
            "choices": choices, **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _frames(plan: Any) -> Iterator[bytes]:
    padding = plan.hostile.get("padding") or 0
    for start in range(0, padding, 1000):
        yield b"".join(_chunk([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
                       for _ in range(min(1000, padding - start)))
    for token in plan.tokens:
        yield _chunk([{"index": 0, "delta": {"content": token}, "finish_reason": None}])
        if "hugeline" in plan.hostile:
            yield b"data: " + b"a" * ((plan.hostile["hugeline"] or 1) * MIB)  # never ends its line
            return
    yield _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    yield _chunk([], usage=_usage(plan))
    yield b"data: [DONE]\n\n"


async def respond(request: web.Request, plan: Any, body: dict[str, Any]) -> web.StreamResponse:
    if "html" in plan.hostile:
        return web.Response(text="<html><body><h1>Welcome to nginx!</h1></body></html>", content_type="text/html")
    if not body.get("stream"):
        size = (plan.hostile.get("bomb") or 0) * MIB
        return await _send(request, plan, "application/json", _whole(plan, size), gzip="gzip" in plan.hostile or size > 0)
    return await _send(request, plan, "text/event-stream", _frames(plan), gzip="gzip" in plan.hostile, flush_each=True)


def _whole(plan: Any, size: int) -> Iterator[bytes]:
    """A whole answer in pieces; with #bomb its text is ``size`` bytes, made as it is written."""
    text = "".join(plan.tokens) if not size else ""
    head = json.dumps({"id": "chatcmpl-hostile", "object": "chat.completion", "created": int(time.time()),
                       "model": "hostile", "usage": _usage(plan),
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "@@"}}]})
    before, after = head.encode().split(b"@@")
    yield before + text.encode()
    for _ in range(size // MIB):
        yield b"a" * MIB
    yield after


async def _send(
    request: web.Request, plan: Any, content_type: str, pieces: Iterator[bytes], gzip: bool, flush_each: bool = False
) -> web.StreamResponse:
    """Write ``pieces`` as they come, gzip-compressed if asked; ``flush_each``: each piece is
    decodable on arrival (a stream), and #slow spaces them."""
    headers = {"Content-Type": content_type, **({"Content-Encoding": "gzip"} if gzip else {})}
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    packer = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS) if gzip else None
    try:
        for piece in pieces:
            wire = piece if packer is None else packer.compress(piece) + (packer.flush(zlib.Z_SYNC_FLUSH) if flush_each else b"")
            for at in range(0, len(wire), 64 * 1024):
                await resp.write(wire[at : at + 64 * 1024])
            if flush_each and plan.delay_s:
                await asyncio.sleep(plan.delay_s)
        if packer is not None:
            await resp.write(packer.flush())
        await resp.write_eof()
    except ConnectionError:
        request["record"]["disconnected"] = True
    return resp
