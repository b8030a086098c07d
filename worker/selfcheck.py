"""Does this litellm still behave as the lean stream path expects? Asked once, at warm-up.

The lean path relies on litellm internals: that its OpenAI SDK client and its module-level client
are the ones the worker installs (``aclient_session``, ``module_level_aclient``), that a stream it
reads to the first token can end there, and that its Router leaves the rest alone. litellm ships
several releases a week, and any of that may change. So the worker streams a known answer from a
loopback server through a Router of its own, in both wire formats, and checks that the tap saw
each stream and that the text, finish and usage came out whole. If not, it says which part and
litellm's version in one WARNING, and serves on litellm's own path: slower, never broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Final

from llm_pool_contracts import Job

PROBE_GROUP: Final = "llm-worker-lean-probe"
WORDS: Final = ("lean", " path", " probe")
USAGE: Final = (7, 3)


def _openai_body() -> bytes:
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": None}]} for w in WORDS]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": USAGE[0], "completion_tokens": USAGE[1], "total_tokens": sum(USAGE)}})
    frames = [f"data: {json.dumps({'id': 'probe', 'object': 'chat.completion.chunk', 'created': 0, 'model': 'probe', **e})}\n\n"
              for e in events]
    return ("".join(frames) + "data: [DONE]\n\n").encode()


def _anthropic_body() -> bytes:
    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    message: dict[str, Any] = {"id": "probe", "type": "message", "role": "assistant", "model": "probe", "content": [],
               "stop_reason": None, "usage": {"input_tokens": USAGE[0], "output_tokens": 1}}
    parts = [event("message_start", {"message": message}),
             event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    parts += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}}) for w in WORDS]
    parts += [event("content_block_stop", {"index": 0}),
              event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": USAGE[1]}}),
              event("message_stop", {})]
    return "".join(parts).encode()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP request, answered with the probe's stream in the format its path asks for."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        body = _anthropic_body() if b"/messages" in head.split(b"\r\n", 1)[0] else _openai_body()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def loopback() -> AsyncIterator[str]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def probe_router(url: str) -> Any:
    from litellm.router import Router

    deployments = [
        {"model_name": PROBE_GROUP, "litellm_params": {"model": "openai/probe", "api_base": url + "/v1", "api_key": "probe"}},
        {"model_name": PROBE_GROUP + "-anthropic", "litellm_params": {"model": "anthropic/probe", "api_base": url, "api_key": "probe"}},
    ]
    return Router(model_list=deployments, num_retries=0, timeout=10)


def probe_jobs() -> list[Job]:
    messages = [{"role": "user", "content": "probe"}]
    return [Job(request_id=f"lean-probe-{i}", tenant_id="probe", model=group, messages=messages, stream=True)
            for i, group in enumerate((PROBE_GROUP, PROBE_GROUP + "-anthropic"))]


def judge(job: Job, completion: Any, tapped: bool) -> str | None:
    """What went wrong with one probe stream, or None."""
    fmt = "Anthropic" if job.model.endswith("anthropic") else "OpenAI"
    if not tapped:
        return f"the tap never saw the {fmt} stream (litellm no longer calls through the client the worker installs)"
    got = (completion.content, completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.finish_reason)
    if got != ("".join(WORDS), *USAGE, "stop"):
        return f"the {fmt} stream came out as {got!r}, not {('lean path probe', *USAGE, 'stop')!r}"
    return None
