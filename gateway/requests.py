"""Request bodies, the seed's and OpenAI's, read into a contract :class:`~contracts.Job`.

A body is refused with a 400 that names the field, before anything is enqueued. Generation
options the pool cannot honour are refused too, rather than dropped in silence, except where
their value is the one that changes nothing (``n: 1``, a penalty of 0), which SDKs often send.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Final

import msgspec

from llm_pool_contracts import Job, is_ident

PARAMS: Final = ("temperature", "top_p", "max_tokens", "stop", "seed", "tool_choice", "response_format")
#: Read elsewhere, or with no bearing on the answer.
HANDLED: Final = frozenset({"model", "messages", "tools", "stream", "stream_options", "resumable", "request_id", "tenant_id",
                            "max_completion_tokens", "params", "user", "store", "metadata", "parallel_tool_calls",
                            "service_tier"})
#: Options the pool does not pass on, accepted only at the value that changes nothing.
NEUTRAL: Final[dict[str, Any]] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}


class BadRequest(Exception):
    """The body cannot become a job; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def read_body(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def make_job(body: dict[str, Any], tenant_id: str, *, stream: bool, request_id: str | None, resumable: bool,
             timeout_s: float) -> Job:
    """The job for ``body``, on behalf of ``tenant_id`` (from the API key; a ``tenant_id`` in the
    body, which the seed's callers may send, is not read). Its deadline is now + ``timeout_s``."""
    _refuse_unsupported(body)
    rid = request_id or body.get("request_id") or uuid.uuid4().hex
    if not is_ident(rid):
        raise BadRequest("request_id must be 1 to 128 letters, digits or . _ : -", "request_id")
    fields = {
        "request_id": rid,
        "tenant_id": tenant_id,
        "model": body.get("model"),
        "messages": body.get("messages"),
        "stream": stream,
        "tools": body.get("tools") or None,
        "params": _params(body),
        "deadline_ms": int((time.time() + timeout_s) * 1000),
        "resumable": resumable or body.get("resumable") is True,
    }
    try:
        return msgspec.convert(fields, Job)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc), _field_of(str(exc))) from None


def _refuse_unsupported(body: dict[str, Any]) -> None:
    unsupported = sorted(
        key for key, value in body.items()
        if key not in HANDLED and key not in PARAMS and value is not None and NEUTRAL.get(key, ...) != value
    )
    if unsupported:
        raise BadRequest(f"not supported by this pool: {', '.join(unsupported)}", unsupported[0], code="unsupported_parameter")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("`model` must name a model group (GET /v1/models)", "model")


def _params(body: dict[str, Any]) -> dict[str, Any] | None:
    """Generation options, from the seed's ``params`` object or from the top level (OpenAI's place)."""
    nested = body.get("params")
    if nested is not None and not isinstance(nested, dict):
        raise BadRequest("`params` must be an object", "params")
    params = {k: body[k] for k in PARAMS if body.get(k) is not None}
    if body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    params.update(nested or {})
    return params or None


def _field_of(problem: str) -> str | None:
    """The top-level field a msgspec validation message is about (``… - at `$.params.top_p```)."""
    found = re.search(r"at `\$\.([A-Za-z_]+)", problem)
    return found.group(1) if found else None
