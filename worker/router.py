"""Routes a job to a model group through litellm's Router, and turns its answer into a Completion.

The litellm Router is the one place that chooses deployments, retries, falls back and cools
deployments down. This module adds what the wire contract needs on top: the deployment that
answered, usage (estimated only when the provider sent none), cost from litellm's price map,
tool calls assembled from a stream, and provider errors sorted into contract error codes.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

import asyncio
import contextlib
import gc
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import litellm
import structlog
from litellm.router import Router

from llm_pool_contracts import ErrorCode, Job, ToolCall, Usage
from llm_pool_worker import litellm_parts, selfcheck
from llm_pool_worker.assembly import AnswerTooLarge, Completion, StreamAssembler
from llm_pool_worker.errors import CALL_FAILURES, describe, judge
from llm_pool_worker.lean import SLICE_S, StreamBroken, read_rest
from llm_pool_worker.model_config import PRICE_KEYS, Deployment, ModelConfig
from llm_pool_worker.transport import CALL_HEADER, Limits, ProviderTransport, install_transport

log = structlog.get_logger(__name__)

# Called with each piece of streamed text; returns True when the event loop should run now,
# because the text started a batch of replies that can leave.
OnText = Callable[[str], bool]

LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


class RouteError(Exception):
    """A job's call failed in a way the contract names; ``message`` is safe to send. ``restart``:
    the stream broke after chunks, and starting again as the next attempt may succeed."""

    def __init__(self, code: ErrorCode, message: str, restart: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.restart = restart


@dataclass(frozen=True, slots=True)
class Price:
    input_per_token: float
    output_per_token: float

    def cost(self, usage: Usage) -> float:
        return usage.prompt_tokens * self.input_per_token + usage.completion_tokens * self.output_per_token


def warn_drift(event: str, **fields: Any) -> None:
    """One WARNING of a litellm that is not what the worker reads, with litellm's version: the
    operator's first question about it (and what tests/test_litellm_drift.py counts)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("litellm")
    except PackageNotFoundError:
        installed = "unknown"
    log.warning(event, litellm=installed, **fields)


def describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


async def preload(config: ModelConfig) -> None:
    """Pay litellm's lazy imports (providers, HTTP stack) without starting its native runtime:
    one mock call per deployment through ``litellm.acompletion``, not a Router, whose Rust core
    starts threads that a fork would lose. For a supervisor about to fork workers, so that each
    of them shares these pages instead of importing its own copy (about 170 MB, measured)."""
    quiet_litellm()
    messages = [{"role": "user", "content": "warm-up"}]
    for deployment in config.deployments:
        for stream in (False, True):
            try:
                response = await litellm.acompletion(model=deployment.model, messages=messages, mock_response="ok",
                                                     stream=stream, api_key="preload", api_base=deployment.params.get("api_base"))
                if stream:
                    async for _ in response:
                        pass
            except Exception as exc:  # noqa: BLE001  # an optimisation only: the workers' own warm-up decides
                log.debug("preload call failed", model=deployment.model, error=type(exc).__name__)


def router_arguments() -> set[str]:
    """The settings litellm's Router takes (`router_settings` of the YAML)."""
    import inspect

    return set(inspect.signature(Router.__init__).parameters) - {"self", "model_list"}


@dataclass(frozen=True, slots=True)
class SharedState:
    """Where the Routers of a pool keep what they must agree on: cooldowns, fail counts, and the
    rpm/tpm counted per deployment. Without it each process keeps its own view."""

    redis_url: str
    namespace: str


def router_settings(config: ModelConfig, shared: SharedState | None, enforce: bool = True) -> dict[str, Any]:
    """The Router's arguments: the YAML's ``router_settings``, with the pool's Redis (unless the
    YAML names its own, as a LiteLLM proxy config may) and, when a deployment sets ``rpm`` or
    ``tpm``, litellm's check that holds the limit against counts read from that Redis."""
    settings = dict(config.router_settings)
    if shared is not None and not {"redis_url", "redis_host"} & settings.keys():
        settings["redis_url"] = shared.redis_url
        settings["cache_kwargs"] = {"namespace": shared.namespace, **(settings.get("cache_kwargs") or {})}
    if enforce and any(d.params.get(limit) for d in config.deployments for limit in ("rpm", "tpm")):
        checks = list(settings.get("optional_pre_call_checks") or [])
        settings["optional_pre_call_checks"] = [*checks, *{"enforce_model_rate_limits"} - set(checks)]
    return settings


def quiet_litellm() -> None:
    """Stop litellm printing on its own. Its records reach our handlers only when we log at DEBUG:
    each failed job is logged once by the worker, where litellm logs each failed attempt in many lines."""
    litellm.suppress_debug_info = True
    litellm.disable_streaming_logging = True
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
        logger.propagate = True


def price_of(deployment: Deployment) -> Price | None:
    """The per-token price of a deployment, from its own params or litellm's price map.

    litellm prices an unmapped OpenAI or Anthropic model at 0.0, which is not "free": such a
    deployment has no price, and its cost goes on the wire as null.
    """
    custom = [deployment.params.get(k) for k in PRICE_KEYS]
    if all(isinstance(v, int | float) for v in custom):
        return Price(float(custom[0]), float(custom[1]))  # type: ignore[arg-type]
    try:
        info = litellm.get_model_info(model=deployment.model)
    except Exception:  # noqa: BLE001 - litellm raises plain Exception for unmapped models
        return None
    cin, cout = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if cin is None or cout is None:
        return None
    return Price(float(cin), float(cout))


async def close_stream(stream: Any) -> None:
    """Close the provider connection of a stream that ended early (cancelled, timed out, broken).

    litellm's Router returns a wrapper whose ``aclose`` closes the HTTP response. A stream read to
    its end is already closed, and closing again is a no-op. A litellm without it leaves the
    connection to the transport, which closes every body of a call when the call is over.
    """
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await asyncio.shield(close())


class ModelRouter:
    """The model groups of one worker process."""

    def __init__(self, config: ModelConfig, lean_streams: bool = True, limits: Limits | None = None,
                 shared: SharedState | None = None) -> None:
        quiet_litellm()
        for key, value in config.litellm_settings.items():  # before the transport: TLS settings must reach it
            setattr(litellm, key, value)
        self.limits = limits or Limits()
        self.transport: ProviderTransport = self._install_transport(lean_streams)
        self.config = config
        self.groups = config.groups
        self._deployments = config.by_id()
        self._prices = {d.id: price_of(d) for d in config.deployments}
        self._shared = shared
        # The Router that serves is made after the warm-up: litellm counts every call, mock ones
        # too, through process-wide callbacks, and the mocks must not spend a deployment's rpm.
        self._warming: Any = self._make_router(None, enforce=False)
        self._serving: Any = None

    def _install_transport(self, lean_streams: bool) -> ProviderTransport:
        """The transport under litellm's clients; when this litellm lacks a hook it needs, a
        transport that no call passes through: litellm's own path, its own clients, no bounds."""
        try:
            return install_transport(self.limits, split=lean_streams)
        except (ImportError, AttributeError, TypeError) as exc:
            warn_drift("this litellm lacks a hook of the worker's HTTP transport; serving on litellm's own path, "
                       "without the worker's bounds on answers", missing=describe_exc(exc))
            return ProviderTransport(httpx.AsyncHTTPTransport(), self.limits, split=False)

    def _make_router(self, shared: SharedState | None, enforce: bool = True) -> Any:
        return Router(model_list=[d.entry() for d in self.config.deployments], **router_settings(self.config, shared, enforce))

    @property
    def lean_streams(self) -> bool:
        return self.transport.split

    @lean_streams.setter
    def lean_streams(self, on: bool) -> None:
        self.transport.split = on

    async def warm_up(self) -> None:
        """Pay litellm's lazy imports (about a second per provider) before the first job does.

        A mock response per group, streamed and not, goes through the same code paths as a
        real call without touching the network. Then the objects made so far are frozen (gc).
        The Router that serves is made after it (see ``__init__`` and ``open``).
        """
        messages = [{"role": "user", "content": "warm-up"}]
        assert self._warming is not None, "warm_up() runs once"
        answers = []
        for stream in (False, True):
            for group in sorted(self.groups):
                response = await self._warming.acompletion(model=group, messages=messages, mock_response="ok", stream=stream)
                if stream:
                    async for _ in response:
                        pass
                answers.append(response)
        if missing := litellm_parts.missing(self._warming, answers, self._deployments.keys()):
            warn_drift("this litellm lacks parts the worker reads; serving without them", missing=missing)
        await self._check_lean_path()
        # Everything alive now (litellm's large import graph above all) lives as long as the process:
        # take it out of the collector's reach. A full collection then takes ~0.1 s instead of ~0.3 s,
        # time during which every job of the worker stands still (measured in tests/test_hostile.py).
        self._warming = None
        gc.collect()
        gc.freeze()

    async def _check_lean_path(self) -> None:
        """Turn lean streams off, with one WARNING, if this litellm does not behave as they need."""
        if not self.lean_streams:
            return
        try:
            problem = await self._probe_lean_path()
        except Exception as exc:  # noqa: BLE001  # whatever broke, the answer is the same: litellm's own path
            problem = f"the probe stream failed: {describe_exc(exc)}"
        if problem is not None:
            warn_drift("lean streams do not work with this litellm; serving streams on litellm's own path", problem=problem)
            self.lean_streams = False

    async def _probe_lean_path(self) -> str | None:
        async with selfcheck.loopback() as url:
            router = selfcheck.probe_router(url)
            for job in selfcheck.probe_jobs():
                split_before = self.transport.split_count
                completion = await self.stream(job, lambda _text: False, router=router)
                problem = selfcheck.judge(job, completion, self.transport.split_count > split_before)
                if problem is not None:
                    return problem
        return None

    def open(self) -> None:
        """Make the Router that serves, once. The worker calls it after Redis has accepted its
        credentials: with shared state litellm connects at once, and fails noisily when refused."""
        if self._serving is None:
            if self._warming is not None:
                raise RuntimeError("ModelRouter.warm_up() must run before open()")
            self._serving = self._make_router(self._shared)
            self._check_token_counting()

    def _check_token_counting(self) -> None:
        """A lean stream's tokens reach a deployment's ``tpm`` only through litellm's check. Without
        it, streams take litellm's own path, which counts them itself: slower, never over a limit."""
        if not self.lean_streams or not any(d.params.get("tpm") for d in self.config.deployments):
            return
        if litellm_parts.rate_limit_check(self._serving) is None:
            warn_drift("this litellm lacks the check that counts tokens against tpm; serving streams on litellm's own path",
                       missing="Router.optional_callbacks: ModelRateLimitingCheck")
            self.lean_streams = False

    @property
    def _router(self) -> Any:
        self.open()
        return self._serving

    def deployment(self, deployment_id: str | None) -> Deployment | None:
        return self._deployments.get(deployment_id or "")

    def _call_kwargs(self, job: Job, tag: str, stream: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": job.model, "messages": job.messages, **job.provider_params()}
        if job.tools:
            kwargs["tools"] = job.tools
        kwargs["extra_headers"] = {CALL_HEADER: f"{tag} {'stream' if stream else 'whole'}"}
        return kwargs

    def _finish(self, job: Job, hidden: Mapping[str, Any], answer: StreamAssembler) -> Completion:
        """The answer in the contract's terms: which deployment answered, usage, cost."""
        deployment = self.deployment(hidden.get("model_id"))
        provider_model = deployment.model if deployment else str(hidden.get("litellm_model_name") or job.model)
        content, tool_calls = answer.content, answer.tool_calls()
        if answer.prompt_tokens and answer.completion_tokens is not None:
            usage = Usage(answer.prompt_tokens, answer.completion_tokens, estimated=False)
        else:
            usage = self._estimate_usage(provider_model, job, content, tool_calls)
        price = self._prices.get(deployment.id) if deployment else None
        finish_reason = answer.finish_reason
        if tool_calls and finish_reason in (None, "stop"):
            finish_reason = "tool_calls"
        return Completion(
            content=content,
            tool_calls=tool_calls,
            usage=usage,
            provider_model=provider_model,
            finish_reason=finish_reason or "stop",
            cost_usd=price.cost(usage) if price else None,
        )

    @staticmethod
    def _estimate_usage(model: str, job: Job, content: str, tool_calls: list[ToolCall]) -> Usage:
        text = content + "".join(c.function.arguments for c in tool_calls)
        try:
            prompt = litellm.token_counter(model=model, messages=job.messages)
            completion = litellm.token_counter(model=model, text=text) if text else 0
        except Exception:  # noqa: BLE001 - a count is best effort; fall back to a rough one
            prompt, completion = sum(len(str(m.get("content", ""))) for m in job.messages) // 4, len(text) // 4
        return Usage(int(prompt), int(completion), estimated=True)

    @contextlib.asynccontextmanager
    async def _call(self, job: Job, own_group: bool = True) -> AsyncIterator[str]:
        """One tagged call: its failures become contract errors, and the transport's record of
        it is dropped at the end (closing a parked body nobody read)."""
        if own_group:
            self._require_group(job.model)
        tag = uuid.uuid4().hex
        try:
            yield tag
        except CALL_FAILURES as exc:
            failure: BaseException = exc
            if self.transport.record(tag).too_large:
                failure = AnswerTooLarge(f"the answer's body is over {self.limits.body_bytes} bytes")
            verdict = judge(failure, chunks_sent=False)
            raise RouteError(verdict.code, f"{verdict.summary}: {describe(job.model, failure)}") from exc
        finally:
            await self.transport.forget(tag)

    async def complete(self, job: Job) -> Completion:
        """One non-streamed answer."""
        async with self._call(job) as tag:
            response = await self._router.acompletion(**self._call_kwargs(job, tag, stream=False))
            choice = response.choices[0]
            answer = StreamAssembler(self.limits.answer_chars)  # a whole answer is a stream of one delta
            answer.add_text(choice.message.content or "")
            for i, call in enumerate(choice.message.tool_calls or ()):
                answer.add_tool_fragment(i, call.id, call.function.name, call.function.arguments)
            usage = getattr(response, "usage", None)
            answer.set_usage(getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None))
            answer.finish_reason = choice.finish_reason
            return self._finish(job, litellm_parts.hidden_params(response), answer)

    async def stream(self, job: Job, on_text: OnText, router: Any = None) -> Completion:
        """A streamed answer: ``on_text`` sees each piece of text as it arrives.

        With lean streams on, litellm reads the stream up to its first token and the rest is
        parsed here (see ``llm_pool_worker.lean``); other providers stay on litellm's path throughout.
        A failure after chunks were sent is judged here, not by litellm (``llm_pool_worker.errors``).
        ``router``: another Router than the serving one (the start-up probe's).
        """
        answer = StreamAssembler(self.limits.answer_chars)
        async with self._call(job, own_group=router is None) as tag:
            stream: Any = None
            hidden: Mapping[str, Any] = {}
            try:
                stream = await (router or self._router).acompletion(
                    **self._call_kwargs(job, tag, stream=True), stream=True, stream_options={"include_usage": True}
                )
                tapped = self.transport.take(tag)
                loop = asyncio.get_running_loop()
                turn_at = loop.time() + SLICE_S
                async for chunk in stream:
                    if self._take_chunk(chunk, answer, on_text) or loop.time() >= turn_at:
                        await asyncio.sleep(0)  # let the publisher send the batch; never hold the loop long
                        turn_at = loop.time() + SLICE_S
                hidden = litellm_parts.hidden_params(stream)
                if tapped is None and self.transport.record(tag).split:
                    raise StreamBroken("the rest of the stream was parked and never taken")  # never one token as a whole answer
                if tapped is not None:
                    answer.forget_end()  # litellm saw a synthetic end after the head
                    stream = None  # litellm is done with this call: let its objects go while the stream runs on
                    await read_rest(tapped, answer, on_text)
                    await self._count_tokens(hidden, answer)
            except CALL_FAILURES as exc:
                if not answer.chunks_seen:
                    raise
                self._broken_after_chunks(job, hidden or litellm_parts.hidden_params(stream), exc)
            finally:
                await close_stream(stream)
        return self._finish(job, hidden, answer)

    async def _count_tokens(self, hidden: Mapping[str, Any], answer: StreamAssembler) -> None:
        """litellm counts a deployment's tokens against its ``tpm`` when it reads a stream to the
        end; a lean stream's rest it never sees, so its tokens are reported here, to the same check."""
        deployment = self.deployment(hidden.get("model_id"))
        total = (answer.prompt_tokens or 0) + (answer.completion_tokens or 0)
        if deployment is None or not total or not {"tpm", "tpd"} & deployment.params.keys():
            return
        payload = {"standard_logging_object": {
            "model_id": deployment.id, "total_tokens": total, "hidden_params": {"litellm_model_name": deployment.model}}}
        if (check := litellm_parts.rate_limit_check(self._router)) is not None:
            with contextlib.suppress(Exception):  # a count lost is a limit less exact, never a failed job
                await check.async_log_success_event(payload, None, None, None)

    def _broken_after_chunks(self, job: Job, hidden: Mapping[str, Any], exc: BaseException) -> None:
        verdict = judge(exc, chunks_sent=True)
        if verdict.cool_down:
            self._cool_down(hidden, exc)
        raise RouteError(verdict.code, f"{verdict.summary}: {describe(job.model, exc)}", restart=verdict.restart) from exc

    @staticmethod
    def _take_chunk(chunk: Any, answer: StreamAssembler, on_text: OnText) -> bool:
        """Apply one litellm chunk; True when its text started a batch of replies that can leave."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            answer.set_usage(getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None))
        if not chunk.choices:
            return False
        choice = chunk.choices[0]
        delta = choice.delta
        turn = False
        if delta.content:
            answer.add_text(delta.content)
            turn = on_text(delta.content)
        for call in delta.tool_calls or ():
            fn = call.function
            answer.add_tool_fragment(call.index or 0, call.id, fn.name if fn else None, fn.arguments if fn else None)
        if choice.finish_reason:
            answer.finish_reason = choice.finish_reason
        return turn

    def _cool_down(self, hidden: Mapping[str, Any], exc: BaseException) -> None:
        """Cool down a deployment whose stream broke after tokens, so that the job's restart goes
        elsewhere: litellm counts only failures before the first chunk. A group's only deployment
        is left alone, as litellm leaves it."""
        deployment = self.deployment(hidden.get("model_id"))
        store = litellm_parts.cooldowns(self._router)
        if store is None or deployment is None or sum(d.group == deployment.group for d in self.config.deployments) < 2:
            return
        status = getattr(exc, "status_code", None)
        try:
            store.add_deployment_to_cooldown(deployment.id, exc, status if isinstance(status, int) else 500, None)
        except Exception as cause:  # noqa: BLE001  # best effort: the restart works without it, if less well
            log.warning("a deployment could not be cooled down", deployment=deployment.model, error=describe_exc(cause))
        else:
            log.warning("deployment cooled down after a broken stream", deployment=deployment.model)

    def _require_group(self, group: str) -> None:
        if group not in self.groups:
            known = ", ".join(sorted(self.groups))
            raise RouteError(ErrorCode.UNKNOWN_MODEL, f"no model group '{group}' (known: {known})")
