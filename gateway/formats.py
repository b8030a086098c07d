"""Replies written the way each kind of caller reads them: OpenAI's JSON and SSE, the seed's JSON and NDJSON.

A contract error code becomes an HTTP status before the first byte of a body is sent. Once a
stream has begun its status is 200, so an error travels in the stream, in the caller's format.
"""

from __future__ import annotations

import time
from typing import Any, Final, Protocol

import msgspec

from llm_pool_contracts import Chunk, Done, ErrorCode, Result

_encode = msgspec.json.Encoder().encode

#: The HTTP status of each contract error code (and of the gateway's own: ``queue_full``).
STATUS: Final[dict[str, int]] = {
    ErrorCode.INVALID_JOB: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.CANCELLED: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.PROVIDER_AUTH: 502,
    ErrorCode.ANSWER_TOO_LARGE: 502,
    ErrorCode.INTERRUPTED: 502,
    ErrorCode.TOO_MANY_ATTEMPTS: 502,
    ErrorCode.PROVIDERS_UNAVAILABLE: 503,
    "queue_full": 503,
    ErrorCode.EXPIRED: 504,
    ErrorCode.TIMEOUT: 504,
}
#: OpenAI's error ``type`` for a status.
OPENAI_TYPE: Final = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      409: "conflict_error", 429: "rate_limit_error"}


def status_of(code: str) -> int:
    return STATUS.get(code, 500)


def usage_of(answer: Result | Done) -> dict[str, int]:
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls(answer: Result | Done) -> list[dict[str, Any]]:
    return [msgspec.structs.asdict(call) | {"function": msgspec.structs.asdict(call.function)} for call in answer.tool_calls]


def _pool(answer: Result | Done) -> dict[str, Any]:
    """What the pool adds to OpenAI's shapes, under a key of its own that the SDKs keep and ignore."""
    return {"provider_model": answer.provider_model, "cost_usd": answer.cost_usd, "attempt": answer.attempt,
            "estimated_usage": answer.usage.estimated}


# ---- OpenAI ------------------------------------------------------------------------------------

def openai_error(code: str, message: str, status: int) -> bytes:
    kind = "insufficient_quota" if code == ErrorCode.QUOTA_EXCEEDED else OPENAI_TYPE.get(status, "api_error")
    return _encode({"error": {"message": message, "type": kind, "param": None, "code": code}})


def openai_completion(result: Result, model: str) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": result.content if result.content or not result.tool_calls else None}
    if result.tool_calls:
        message["tool_calls"] = _tool_calls(result)
    return _encode({
        "id": f"chatcmpl-{result.request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage_of(result), "system_fingerprint": None, "x_pool": _pool(result),
    })


def openai_models(groups: list[str]) -> bytes:
    return _encode({"object": "list", "data": [{"id": g, "object": "model", "created": 0, "owned_by": "llm-pool"} for g in groups]})


class StreamFormat(Protocol):
    """Writes one streamed job's replies for one kind of caller."""

    media_type: str

    def chunk(self, chunk: Chunk) -> bytes: ...
    def done(self, done: Done) -> bytes: ...
    def error(self, code: str, message: str) -> bytes: ...


class OpenAIEvents:
    """``chat.completion.chunk`` server-sent events; the first carries the role, tool calls come
    whole in one delta before the finish, usage in a last event when asked for (``include_usage``).
    Each event's ``id:`` is ``{attempt}:{seq}``, what ``after`` (or ``Last-Event-ID``) takes to re-attach."""

    media_type = "text/event-stream"

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self.role_sent = False

    def _event(self, choices: list[dict[str, Any]], event_id: str | None = None, **extra: Any) -> bytes:
        data = _encode({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "choices": choices, "system_fingerprint": None, **extra})
        return (f"id: {event_id}\n".encode() if event_id else b"") + b"data: " + data + b"\n\n"

    def _delta(self, delta: dict[str, Any], event_id: str | None = None, finish: str | None = None) -> bytes:
        if not self.role_sent:
            delta, self.role_sent = {"role": "assistant", **delta}, True
        usage = {"usage": None} if self.include_usage else {}
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], event_id, **usage)

    def chunk(self, chunk: Chunk) -> bytes:
        return self._delta({"content": chunk.text}, f"{chunk.attempt}:{chunk.seq}")

    def done(self, done: Done) -> bytes:
        out = b""
        if done.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(done))]
            out += self._delta({"tool_calls": calls})
        out += self._delta({}, f"{done.attempt}:{done.seq}", finish=done.finish_reason)
        if self.include_usage:
            out += self._event([], usage=usage_of(done), x_pool=_pool(done))
        return out + b"data: [DONE]\n\n"

    def error(self, code: str, message: str) -> bytes:
        return b"data: " + openai_error(code, message, status_of(code)) + b"\n\n"


# ---- the seed's API ----------------------------------------------------------------------------

def seed_answer(answer: Result | Done) -> dict[str, Any]:
    return {"request_id": answer.request_id, "content": answer.content, "tool_calls": _tool_calls(answer),
            "finish_reason": answer.finish_reason, "usage": usage_of(answer), "model": answer.model,
            "provider_model": answer.provider_model, "cost_usd": answer.cost_usd}


def seed_error(code: str, message: str) -> bytes:
    return _encode({"type": "error", "code": code, "message": message})


class SeedLines:
    """The seed's NDJSON: ``{"type": "chunk", "text"}`` lines, then ``{"type": "done", …}`` with the
    whole answer's tool calls and usage, or ``{"type": "error", "code", "message"}``."""

    media_type = "application/x-ndjson"

    def chunk(self, chunk: Chunk) -> bytes:
        return _encode({"type": "chunk", "text": chunk.text}) + b"\n"

    def done(self, done: Done) -> bytes:
        return _encode({"type": "done", **seed_answer(done)}) + b"\n"

    def error(self, code: str, message: str) -> bytes:
        return seed_error(code, message) + b"\n"
