"""Deprecated home of the orchestrator's client: import ``llm_pool_client`` instead (until 0.3)."""

import warnings

from llm_pool_client import JobFailed, LLMClient, ReplyTimeout, make_job

warnings.warn("worker.client moved to the `llm_pool_client` package; import from there", DeprecationWarning, stacklevel=2)

__all__ = ["JobFailed", "LLMClient", "ReplyTimeout", "make_job"]
