"""What an exception from a model call means: one table, read top to bottom, first match wins.

| exception | code | worth a new job | after chunks: restart | after chunks: cool down |
| --- | --- | --- | --- | --- |
| the answer outgrew its bound | `answer_too_large` | no | no | no |
| litellm could not build the request (a Python error, no HTTP) | `bad_request` | no | no | no |
| HTTP 401 / 403 | `provider_auth` | no | no | yes |
| HTTP 429 | `rate_limited` | yes, after a pause | yes | yes |
| HTTP 400 / 422, context window, content policy | `bad_request` | no | no | no |
| every deployment cooling down (the Router's own refusal) | `providers_unavailable` | yes, after a pause | yes | no |
| anything else from a provider: 5xx, timeout, connection, broken stream | `providers_unavailable` before chunks, `interrupted` after | yes | yes | yes |

Before the first chunk litellm itself retries, falls back and cools deployments down; after it,
the worker decides, because litellm does not. A bug in the worker is none of these: it is not
caught here, so it ends the job ``internal`` and never cools a healthy deployment down.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai
from litellm import exceptions as llm_errors
from litellm.types.router import RouterRateLimitError

from llm_pool_contracts import ErrorCode
from llm_pool_worker.assembly import AnswerTooLarge
from llm_pool_worker.lean import StreamBroken

#: Every exception a model call may end with that is the provider's doing, or litellm's.
CALL_FAILURES = (openai.OpenAIError, RouterRateLimitError, StreamBroken, AnswerTooLarge)

_BAD_REQUEST = (
    llm_errors.BadRequestError,
    llm_errors.UnprocessableEntityError,
    llm_errors.ContentPolicyViolationError,
    llm_errors.ContextWindowExceededError,
)
_AUTH = (llm_errors.AuthenticationError, llm_errors.PermissionDeniedError)
_LOCAL = (TypeError, KeyError, ValueError, AttributeError, IndexError)  # raised by litellm's own code


@dataclass(frozen=True, slots=True)
class Verdict:
    code: ErrorCode
    retryable: bool  # worth a new job (CONTRACT.md §2)
    restart: bool  # after chunks were sent: start again as the next attempt
    cool_down: bool  # after chunks were sent: cool the deployment down, so the restart goes elsewhere
    summary: str  # the start of the message the orchestrator reads


def judge(exc: BaseException, chunks_sent: bool) -> Verdict:
    """The table above, for one exception."""
    if isinstance(exc, AnswerTooLarge):
        return Verdict(ErrorCode.ANSWER_TOO_LARGE, False, False, False, "the answer is too large")
    if _never_sent(exc):
        return Verdict(ErrorCode.BAD_REQUEST, False, False, False, "litellm could not build a request from the job")
    if isinstance(exc, _AUTH):
        return Verdict(ErrorCode.PROVIDER_AUTH, False, False, True, "the provider refused the worker's credentials")
    if isinstance(exc, llm_errors.RateLimitError):
        return Verdict(ErrorCode.RATE_LIMITED, True, True, True, "the provider is rate-limiting the worker")
    if isinstance(exc, _BAD_REQUEST):
        return Verdict(ErrorCode.BAD_REQUEST, False, False, False, "the provider rejected the request")
    if isinstance(exc, RouterRateLimitError):
        return Verdict(ErrorCode.PROVIDERS_UNAVAILABLE, True, chunks_sent, False, "every deployment is cooling down")
    if chunks_sent:
        return Verdict(ErrorCode.INTERRUPTED, True, True, True, "the provider stream broke part-way")
    return Verdict(ErrorCode.PROVIDERS_UNAVAILABLE, True, False, False, "every deployment and fallback failed")


def _never_sent(exc: BaseException) -> bool:
    """litellm wraps its own failure to build a request (a TypeError on odd content, a KeyError on
    an odd tool) as a connection error: a Python error on the chain, and no network error."""
    if not isinstance(exc, llm_errors.APIConnectionError):
        return False
    chain, seen = exc.__cause__ or exc.__context__, 0
    local = False
    while chain is not None and seen < 16:
        if isinstance(chain, OSError | openai.APIConnectionError) or type(chain).__module__.startswith(("httpx", "aiohttp")):
            return False
        local = local or isinstance(chain, _LOCAL)
        chain, seen = chain.__cause__ or chain.__context__, seen + 1
    return local


def describe(group: str, exc: BaseException) -> str:
    """A one-line account of a failure, without the provider's body or litellm's hints."""
    if isinstance(exc, RouterRateLimitError):
        return f"model group '{group}': every deployment is cooling down after failures"
    if isinstance(exc, AnswerTooLarge | StreamBroken):
        return f"model group '{group}': {exc}"
    status = getattr(exc, "status_code", None)
    kind = type(exc).__name__
    return f"model group '{group}': {kind}" + (f" (HTTP {status})" if isinstance(status, int) else "")
