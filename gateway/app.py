"""The HTTP routes: the seed's API, OpenAI's chat completions, re-attaching to a resumable stream, health.

Every completion is a job on the pool's queue, enqueued through :class:`client.LLMClient`; the
gateway calls no provider and imports no litellm. The tenant is the API key's, never the body's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from llm_pool_client import JobFailed, LLMClient, QueueFull
from llm_pool_contracts import Error, ErrorCode, Job, Keys, Reply, Result
from llm_pool_gateway.auth import ApiKeys
from llm_pool_gateway.formats import (
    OpenAIEvents,
    SeedLines,
    StreamFormat,
    openai_completion,
    openai_error,
    openai_models,
    seed_answer,
    seed_error,
    status_of,
)
from llm_pool_gateway.relay import CallerLeft, close_replies, first_reply, stream_body
from llm_pool_gateway.requests import BadRequest, make_job, read_body
from llm_pool_worker.model_config import DECLARED, load_model_config
from llm_pool_worker.ops import fresh, heartbeats
from llm_pool_worker.settings import Settings

log = structlog.get_logger("gateway")

JSON = "application/json"
WAIT_GRACE_S = 5.0  # wait this much past a job's deadline, for the worker's own `expired` or `timeout`
ErrorBody = Callable[[str, str, int], bytes]


def _seed_error(code: str, message: str, _status: int) -> bytes:
    return seed_error(code, message)


class Gateway:
    """What the routes share: the pool's client, the API keys, the model groups."""

    def __init__(self, settings: Settings, client: LLMClient, api_keys: ApiKeys, groups: list[str]) -> None:
        self.settings = settings
        self.client = client
        self.keys = client.keys
        self.api_keys = api_keys
        self.groups = groups

    async def tenant(self, request: Request) -> str:
        tenant = await self.api_keys.tenant_of(request.headers.get("authorization"))
        if tenant is None:
            raise BadRequest("a valid API key is needed: Authorization: Bearer <key>", status=401, code="invalid_api_key")
        return tenant

    async def job(self, request: Request, tenant: str, *, stream: bool | None = None) -> tuple[Job, dict[str, Any]]:
        """The request's job; streamed as the route says, or (``None``) as the body's ``stream`` says."""
        body = read_body(await _body(request, self.settings.max_job_bytes))
        streamed = body.get("stream") is True if stream is None else stream
        job = make_job(body, tenant, stream=streamed, request_id=request.headers.get("x-request-id"),
                       resumable=self.settings.resumable_streams, timeout_s=self.settings.job_timeout_s)
        if job.model not in self.groups:
            raise BadRequest(f"no model group `{job.model}`; groups: {', '.join(self.groups)}", "model", 404, ErrorCode.UNKNOWN_MODEL)
        return job, body

    async def complete(self, request: Request, job: Job, form: StreamFormat | None,
                       whole: Callable[[Result], bytes], error: ErrorBody) -> Response:
        """Enqueue ``job`` and answer: a stream in ``form`` once its first reply is in, or ``whole``."""
        if job.resumable:
            await self._own(job)
        replies = self.client.replies(job, self.settings.job_timeout_s + WAIT_GRACE_S)
        return await self.respond(request, replies, job.request_id, job.resumable, form, whole, error)

    async def respond(self, request: Request, replies: AsyncIterator[Reply], request_id: str, resumable: bool,
                      form: StreamFormat | None, whole: Callable[[Result], bytes], error: ErrorBody) -> Response:
        """The first reply decides the status; then the rest streams in ``form``, or ``whole`` is the body."""
        headers = {"x-request-id": request_id}
        try:
            first = await first_reply(request, replies)
        except QueueFull as exc:
            return Response(error("queue_full", str(exc), 503), 503, headers | _retry_after(503), JSON)
        except CallerLeft:
            log.info("caller left before the answer", request_id=request_id)
            return Response(status_code=499)
        if isinstance(first, Error):
            await close_replies(replies)
            status = status_of(first.code)
            return Response(error(first.code, first.message, status), status, headers | _retry_after(status), JSON)
        if form is not None:
            return StreamingResponse(stream_body(first, replies, form, resumable), media_type=form.media_type,
                                     headers=headers | {"cache-control": "no-cache", "x-accel-buffering": "no"})
        await close_replies(replies)
        assert isinstance(first, Result)  # a whole job's only reply
        return Response(whole(first), 200, headers, JSON)

    async def _own(self, job: Job) -> None:
        """Note who started a resumable job, so that only that tenant re-attaches (first one wins)."""
        owner = json.dumps({"tenant_id": job.tenant_id, "model": job.model})
        ttl = self.settings.result_ttl_s + int(self.settings.job_timeout_s)  # outlives the kept replies
        await self.client.redis.set(self.keys.owner(job.request_id), owner, nx=True, ex=ttl)

    async def owner(self, request_id: str) -> dict[str, Any] | None:
        raw = await self.client.redis.get(self.keys.owner(request_id))
        return json.loads(raw) if raw else None


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is longer than a job may be (not read whole first)."""
    too_large = BadRequest(f"the body is over {limit} bytes, the most a job may be (LLM_WORKER_MAX_JOB_BYTES)", status=413,
                           code="request_too_large")
    declared = request.headers.get("content-length") or "0"
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _retry_after(status: int) -> dict[str, str]:
    return {"retry-after": "1"} if status in (429, 503) else {}


def refusal(exc: BadRequest, error: ErrorBody) -> Response:
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else {}
    return Response(error(exc.code, exc.message, exc.status), exc.status, headers, JSON)


async def redis_unavailable(request: Request, exc: Exception) -> Response:
    """Redis is away: nothing could be enqueued (or answered); the caller may retry."""
    log.warning("redis unavailable", error=type(exc).__name__, path=request.url.path)
    error = openai_error if request.url.path.startswith("/v1/") else _seed_error
    message = f"the queue's redis does not answer ({type(exc).__name__}); retry shortly"
    return Response(error("redis_unavailable", message, 503), 503, _retry_after(503), JSON)


def create_app(settings: Settings) -> FastAPI:
    config = load_model_config(settings.config, env=DECLARED)
    groups = sorted(config.groups)
    state: dict[str, Gateway] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=settings.redis_socket_timeout_s)
        async with LLMClient(redis, settings.prefix, owns_redis=True) as client:
            state["gateway"] = Gateway(settings, client, ApiKeys(redis, Keys(settings.prefix), config.api_keys), groups)
            log.info("gateway ready", groups=groups, api_keys_in_config=len(config.api_keys))
            yield

    app = FastAPI(title="llm-pool-worker gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(aioredis.RedisError, redis_unavailable)
    app.add_exception_handler(OSError, redis_unavailable)
    add_openai_routes(app, state)
    add_seed_routes(app, state)
    return app


def add_openai_routes(app: FastAPI, state: dict[str, Gateway]) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gateway = state["gateway"]
        try:
            tenant = await gateway.tenant(request)
            job, body = await gateway.job(request, tenant)
        except BadRequest as exc:
            return refusal(exc, openai_error)
        options = body.get("stream_options") or {}
        form = OpenAIEvents(job.request_id, job.model, bool(options.get("include_usage"))) if job.stream else None
        return await gateway.complete(request, job, form, lambda result: openai_completion(result, job.model), openai_error)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway = state["gateway"]
        try:
            await gateway.tenant(request)
        except BadRequest as exc:
            return refusal(exc, openai_error)
        return Response(openai_models(gateway.groups), media_type=JSON)

    @app.get("/v1/requests/{request_id}/stream")
    async def reattach(request: Request, request_id: str, after: str | None = None, format: str = "sse",
                       include_usage: bool = False) -> Response:
        gateway = state["gateway"]
        try:
            tenant = await gateway.tenant(request)
            owner = await gateway.owner(request_id)
            if owner is None or owner["tenant_id"] != tenant:
                raise BadRequest(f"no resumable request {request_id} of this tenant", "request_id", 404, "not_found")
            seen = parse_after(after or request.headers.get("last-event-id"))
        except BadRequest as exc:
            return refusal(exc, openai_error)
        form: StreamFormat = SeedLines() if format == "ndjson" else OpenAIEvents(request_id, owner["model"], include_usage)
        replies = resumed(gateway.client, request_id, seen, gateway.settings.job_timeout_s + WAIT_GRACE_S)
        return await gateway.respond(request, replies, request_id, True, form, _never_whole, openai_error)


def _never_whole(result: Result) -> bytes:  # pragma: no cover - a re-attached stream is never whole
    raise AssertionError("a re-attached stream has no whole answer")


def parse_after(value: str | None) -> tuple[int, int]:
    """``after`` (or ``Last-Event-ID``): ``attempt:seq`` of the last chunk seen, or a bare ``seq`` of attempt 1."""
    if not value:
        return 0, 0
    attempt, _, seq = value.rpartition(":")
    try:
        return int(attempt or 1), int(seq)
    except ValueError:
        raise BadRequest("after must be <attempt>:<seq> (an event id) or <seq>", "after") from None


async def resumed(client: LLMClient, request_id: str, after: tuple[int, int], timeout: float) -> AsyncIterator[Reply]:
    """:meth:`LLMClient.resume` with its error as a reply, like :meth:`LLMClient.replies`."""
    try:
        async with contextlib.aclosing(client.resume(request_id, after, timeout)) as replies:
            async for reply in replies:
                yield reply
    except JobFailed as exc:
        yield exc.error


def add_seed_routes(app: FastAPI, state: dict[str, Gateway]) -> None:
    async def complete(request: Request, stream: bool) -> Response:
        gateway = state["gateway"]
        try:
            job, _body = await gateway.job(request, await gateway.tenant(request), stream=stream)
        except BadRequest as exc:
            return refusal(exc, _seed_error)
        return await gateway.complete(request, job, SeedLines() if stream else None,
                                    lambda result: json.dumps(seed_answer(result)).encode(), _seed_error)

    @app.post("/complete")
    async def complete_whole(request: Request) -> Response:
        return await complete(request, stream=False)

    @app.post("/complete/stream")
    async def complete_stream(request: Request) -> Response:
        return await complete(request, stream=True)

    @app.get("/health")
    async def health() -> Response:
        gateway = state["gateway"]
        try:
            beats = await heartbeats(gateway.client.redis, gateway.keys)
        except (aioredis.RedisError, OSError) as exc:
            return Response(json.dumps({"status": "unavailable", "reason": f"redis does not answer ({type(exc).__name__})"}), 503,
                            media_type=JSON)
        alive = fresh(beats, gateway.settings.heartbeat_s)
        status = 200 if alive else 503
        body = {"status": "ok" if alive else "unavailable", "workers": len(alive), "in_flight": sum(b.in_flight for b in alive)}
        if not alive:
            body["reason"] = "no worker has a fresh heartbeat"
        return Response(json.dumps(body), status, media_type=JSON)

