#!/usr/bin/env python3
"""A local stand-in for LLM providers, speaking OpenAI, Anthropic and Ollama chat over HTTP.

The demo and the tests point real litellm deployments at it, so that litellm's own
provider adapters are exercised over real sockets. It is also the fault injector.

Behaviour is chosen by directives, read from the deployment's model name (``+``-separated,
e.g. ``openai/fail-503`` or ``ollama_chat/slow-20+drop-3``) and from ``#name=value`` words in
the last user message (e.g. ``"hello #tokens=50 #tool"``):

=============  =================================================================
``tokens-N``   answer with N tokens ``t0 t1 …`` instead of echoing the prompt
``tool``       answer with a call of the first tool offered (arguments echo the text)
``fail-S``     answer HTTP status S with a provider-style error body
``hang``       accept the request and never answer
``drop-N``     streaming: close the connection after N chunks (non-stream: at once)
``stall-N``    streaming: fall silent after N chunks, keeping the connection open
``slow-MS``    wait MS milliseconds before each chunk (and before a non-stream answer)
``length``     finish with ``length`` instead of ``stop``
``nousage``    send no token counts
=============  =================================================================

Without directives the answer echoes the last user message word by word. Every call is
recorded; ``GET /_calls`` lists them and ``POST /_reset`` forgets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

try:
    from scripts import hostile
except ImportError:  # run as a script: scripts/ is on sys.path
    import hostile  # type: ignore[no-redef]

DIRECTIVE_WORD = re.compile(r"#([a-z]+)(?:=([0-9]+))?")
# a provider, or a proxy in front of it, behaving badly (OpenAI format); see scripts/hostile.py
HOSTILE = ("html", "gzip", "bomb", "hugeline", "padding", "negusage", "strusage")


@dataclass
class Plan:
    """What one request asked the stand-in to do."""

    tokens: list[str]
    prompt_tokens: int
    tool: dict[str, Any] | None = None
    fail: int | None = None
    hang: bool = False
    stall_after: int | None = None
    drop_after: int | None = None
    delay_s: float = 0.0
    finish: str = "stop"
    usage: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    hostile: dict[str, int | None] = field(default_factory=dict)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _directives(model: str, text: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for part in model.rsplit("/", maxsplit=1)[-1].split("+"):
        name, _, value = part.partition("-")
        found[name] = int(value) if value.isdigit() else None
    for name, value in DIRECTIVE_WORD.findall(text):
        found[name] = int(value) if value else None
    return found


def make_plan(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Plan:
    user_text = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    prompt_words = sum(len(DIRECTIVE_WORD.sub("", _text_of(m.get("content"))).split()) for m in messages)
    d = _directives(model, user_text)
    clean = DIRECTIVE_WORD.sub("", user_text).split()
    words = [f"t{i}" for i in range(d["tokens"] or 0)] if "tokens" in d else clean or ["ok"]
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    plan = Plan(tokens=tokens, prompt_tokens=max(1, prompt_words))
    if "tool" in d and tools:
        fn = tools[0].get("function", tools[0])
        plan.tool = {
            "id": "call_" + uuid.uuid4().hex[:12],
            "name": fn.get("name", "tool"),
            "arguments": {"text": " ".join(clean)},
        }
        plan.tokens = []
        plan.finish = "tool_calls"
    plan.fail = d.get("fail")
    plan.hang = "hang" in d
    plan.stall_after = d.get("stall")
    plan.drop_after = d.get("drop")
    plan.delay_s = (d.get("slow") or 0) / 1000
    if "length" in d:
        plan.finish = "length"
    plan.usage = "nousage" not in d
    plan.hostile = {k: v for k, v in d.items() if k in HOSTILE}
    return plan


@web.middleware
async def record_end(request: web.Request, handler: Any) -> web.StreamResponse:
    """Note when each call ended, so that tests can count the calls open at once."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        record = request.get("record")
        if record is not None:
            record["ended"] = time.time()


class StandIn:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[record_end])
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/chat/completions", self.openai)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/api/chat", self.ollama)
        app.router.add_post("/api/show", self.ollama_show)
        app.router.add_get("/api/tags", self.ollama_tags)
        app.router.add_get("/_calls", self.list_calls)
        app.router.add_post("/_reset", self.reset)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def list_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.calls)

    async def reset(self, request: web.Request) -> web.Response:
        self.calls.clear()
        return web.json_response({"ok": True})

    async def _begin(self, request: web.Request, api: str) -> tuple[dict[str, Any], Plan]:
        body = await request.json()
        messages = list(body.get("messages") or [])
        if api == "anthropic" and body.get("system"):
            messages.insert(0, {"role": "system", "content": body["system"]})
        tools = [
            t if api != "anthropic" else {"function": {"name": t.get("name")}}
            for t in body.get("tools") or []
        ]
        plan = make_plan(str(body.get("model", "")), messages, tools)
        user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        record = {
            "api": api,
            "model": body.get("model"),
            "stream": bool(body.get("stream")),
            "text": _text_of(user.get("content")),
            "at": time.time(),
            "disconnected": False,
        }
        self.calls.append(record)
        request["record"] = record
        if plan.hang:
            await asyncio.sleep(3600)
        if plan.delay_s and not body.get("stream"):
            await asyncio.sleep(plan.delay_s * max(1, len(plan.tokens)))
        return body, plan

    @staticmethod
    def _fail(status: int, api: str) -> web.Response:
        if api == "anthropic":
            kind = "overloaded_error" if status >= 500 else "invalid_request_error"
            body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": f"stand-in failure {status}"}}
        elif api == "ollama":
            body = {"error": f"stand-in failure {status}"}
        else:
            body = {"error": {"message": f"stand-in failure {status}", "type": "stand_in", "code": status}}
        return web.json_response(body, status=status)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    async def _emit(
        self,
        request: web.Request,
        plan: Plan,
        frames: AsyncIterator[bytes],
        content_type: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            if plan.delay_s or plan.drop_after is not None or plan.stall_after is not None:
                async for frame in frames:
                    await resp.write(frame)
            else:  # instant answers leave in one write: the stand-in must not be what a benchmark measures
                await resp.write(b"".join([frame async for frame in frames]))
            await resp.write_eof()
        except ConnectionError:  # the client went away mid-stream: noted, and nothing more to say
            request["record"]["disconnected"] = True
        except asyncio.CancelledError:
            request["record"]["disconnected"] = True
            raise
        return resp

    async def _tokens(self, request: web.Request, plan: Plan) -> AsyncIterator[tuple[int, str]]:
        for i, token in enumerate(plan.tokens):
            if plan.drop_after is not None and i >= plan.drop_after:
                await self._drop(request)
            if plan.stall_after is not None and i >= plan.stall_after:
                await asyncio.sleep(3600)  # the connection stays open, silent
            if plan.delay_s:
                await asyncio.sleep(plan.delay_s)
            yield i, token

    # ---- OpenAI ---------------------------------------------------------------------------

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._begin(request, "openai")
        if plan.fail:
            return self._fail(plan.fail, "openai")
        if plan.hostile:
            return await hostile.respond(request, plan, body)
        model = body.get("model", "stand-in")
        rid = "chatcmpl-" + uuid.uuid4().hex[:16]
        created = int(time.time())
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": len(plan.tokens) or 1,
            "total_tokens": plan.prompt_tokens + (len(plan.tokens) or 1),
        }
        tool_calls = (
            [
                {
                    "id": plan.tool["id"],
                    "type": "function",
                    "function": {"name": plan.tool["name"], "arguments": json.dumps(plan.tool["arguments"])},
                }
            ]
            if plan.tool
            else None
        )
        if not body.get("stream"):
            if plan.drop_after is not None:
                return await self._drop(request)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.tokens) if not plan.tool else None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            out: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": plan.finish}],
            }
            if plan.usage:
                out["usage"] = usage
            return web.json_response(out)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and plan.usage

        def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
            chunk.update(extra)
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        async def frames() -> AsyncIterator[bytes]:
            yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for _, token in self._tokens(request, plan):
                yield frame([{"index": 0, "delta": {"content": token}, "finish_reason": None}])
            if tool_calls:
                call = tool_calls[0]
                args = call["function"]["arguments"]
                half = len(args) // 2
                yield frame([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}]}, "finish_reason": None}])
                for piece in (args[:half], args[half:]):
                    yield frame([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": None}])
            yield frame([{"index": 0, "delta": {}, "finish_reason": plan.finish}])
            if include_usage:
                yield frame([], usage=usage)
            yield b"data: [DONE]\n\n"

        return await self._emit(request, plan, frames(), "text/event-stream")

    # ---- Anthropic ------------------------------------------------------------------------

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._begin(request, "anthropic")
        if plan.fail:
            return self._fail(plan.fail, "anthropic")
        model = body.get("model", "stand-in")
        mid = "msg_" + uuid.uuid4().hex[:16]
        stop = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}[plan.finish]
        out_tokens = len(plan.tokens) or 1
        if not body.get("stream"):
            if plan.drop_after is not None:
                return await self._drop(request)
            content: list[dict[str, Any]] = []
            if plan.tokens:
                content.append({"type": "text", "text": "".join(plan.tokens)})
            if plan.tool:
                content.append({"type": "tool_use", "id": plan.tool["id"], "name": plan.tool["name"], "input": plan.tool["arguments"]})
            return web.json_response(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": out_tokens},
                }
            )

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def frames() -> AsyncIterator[bytes]:
            yield event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 1},
                    },
                },
            )
            index = 0
            if plan.tokens:
                yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
                async for _, token in self._tokens(request, plan):
                    yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}})
                yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
                index = 1
            if plan.tool:
                yield event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": plan.tool["id"], "name": plan.tool["name"], "input": {}}})
                args = json.dumps(plan.tool["arguments"])
                half = len(args) // 2
                for piece in (args[:half], args[half:]):
                    yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}})
                yield event("content_block_stop", {"type": "content_block_stop", "index": index})
            yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": out_tokens}})
            yield event("message_stop", {"type": "message_stop"})

        return await self._emit(request, plan, frames(), "text/event-stream")

    # ---- Ollama ---------------------------------------------------------------------------

    async def ollama_show(self, request: web.Request) -> web.Response:
        return web.json_response({"template": "", "model_info": {}, "capabilities": ["completion", "tools"]})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def ollama(self, request: web.Request) -> web.StreamResponse:
        body, plan = await self._begin(request, "ollama")
        if plan.fail:
            return self._fail(plan.fail, "ollama")
        model = body.get("model", "stand-in")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        stop = "length" if plan.finish == "length" else "stop"
        counts = {"prompt_eval_count": plan.prompt_tokens, "eval_count": len(plan.tokens) or 1} if plan.usage else {}
        tool_calls = (
            [{"function": {"name": plan.tool["name"], "arguments": plan.tool["arguments"]}}] if plan.tool else None
        )
        stream = body.get("stream", True)
        if not stream:
            if plan.drop_after is not None:
                return await self._drop(request)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.tokens)}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return web.json_response(
                {"model": model, "created_at": now, "message": message, "done": True, "done_reason": stop, **counts}
            )

        def line(data: dict[str, Any]) -> bytes:
            return json.dumps(data).encode() + b"\n"

        async def frames() -> AsyncIterator[bytes]:
            async for _, token in self._tokens(request, plan):
                yield line({"model": model, "created_at": now, "message": {"role": "assistant", "content": token}, "done": False})
            if tool_calls:
                yield line({"model": model, "created_at": now, "message": {"role": "assistant", "content": "", "tool_calls": tool_calls}, "done": False})
            yield line({"model": model, "created_at": now, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": stop, **counts})

        return await self._emit(request, plan, frames(), "application/x-ndjson")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    parser.add_argument("--tls-key", help="... and this key")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(StandIn().app(), host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=0.5,
                ssl_context=tls)


if __name__ == "__main__":
    main()
